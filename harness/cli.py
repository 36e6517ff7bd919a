"""The `harness` command: one function per verb (DESIGN.md). Bad input: one line on stderr, exit 2."""

import signal
import sys

import click

from harness.errors import HarnessError


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """dsr-harness: train SNNs with DSR and compare them with their baselines."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a recipe field, e.g. -o optim.lr=0.05 (repeatable).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[RUN_DIR]",
              help="Continue from a run folder's last.pt; alone: the newest run of this recipe.")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
def launch(recipe: str, overrides: tuple[str, ...], resume: str | None, dry_run: bool) -> None:
    """Train the model a RECIPE (YAML) describes."""
    from harness.recipe import load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, overrides)
    if dry_run:
        click.echo(recipe_to_yaml(resolved), nl=False)
        return
    from harness.engine.launch import launch as run_launch

    run_launch(resolved, recipe, resume=resume, echo=click.echo)


def run() -> None:
    """Entry point: user errors become one line and exit code 2; SIGTERM ends runs as KILLED."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(standalone_mode=False)
    except HarnessError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
