"""polyculture command line: build diverse synthetic datasets from a YAML build spec.

One module per command group: `build` (check, build, index, publish), `compare` (compare-methods), `serve`, `models`
(models, schema), `tuning` (probe, tune), `generations` (the self-consuming loop). `display` draws consoles and
progress, `errors` maps exceptions to exit codes, `options` holds the shared arguments. Commands are registered here, in the order --help lists them, each
behind the one exit-code table. Commands import their heavy dependencies inside the function, so --help stays fast.
"""

from __future__ import annotations

import os

import typer

from polyculture.cli import build, compare, generations, models, serve, tuning
from polyculture.cli.errors import exit_codes

# Offline by design, and Prefect quiet and local unless the user configured otherwise.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    # Prefect waits 20 s for its temporary local server; beside a model loading on 2 busy cores that is too short.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_key, _value)

app = typer.Typer(
    name="polyculture",
    help="Build diverse synthetic datasets with language models: Verbalized Sampling, embedding dedup, "
    "exact attribute targets, JSON Schema validation and a diversity report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _name, _command in (
    ("build", build.build),
    ("index", build.index),
    ("publish", build.publish),
    ("compare-methods", compare.compare_methods),
    ("check", build.check),
    ("serve", serve.serve),
    ("schema", models.schema),
    ("models", models.models),
    ("probe", tuning.probe),
    ("tune", tuning.tune),
    ("generations", generations.generations),
):
    app.command(_name)(exit_codes(_command))

__all__ = ["app"]
