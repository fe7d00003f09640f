"""Prints the configuration reference table for the README (``python -m receiver.config_doc``)."""

from .config import reference_table


def render() -> str:
    rows = ["| key | expected | default |", "|---|---|---|"]
    rows += [f"| `{k}` | {form.replace('|', '/')} | `{default}` |" for k, form, default in reference_table()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
