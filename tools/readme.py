"""The blocks of README.md and docs/ that measuring scripts rewrite, between <!-- NAME:start --> and <!-- NAME:end -->."""
from pathlib import Path

from files import atomic_write, UserError


def readme_block(path: str | Path, name: str) -> tuple[str, str, str, str, str]:
    """A markdown file split around its `<!-- name:start -->` ... `<!-- name:end -->` block: (head, start marker,
    body, end marker, tail); a UserError when there is no such block."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else ""
    if start not in text or end not in text:
        raise UserError(f"{path} has no '{start}' ... '{end}' block to fill")
    head, rest = text.split(start, 1)
    body, tail = rest.split(end, 1)
    return head, start, body, end, tail


def update_readme_block(path: str | Path, name: str, new_body) -> None:
    """Rewrite the text between `<!-- name:start -->` and `<!-- name:end -->` as new_body(old_body), atomically."""
    head, start, body, end, tail = readme_block(path, name)
    atomic_write(path, lambda f: f.write(f"{head}{start}\n{new_body(body)}\n{end}{tail}".encode()))
    print(f"updated {path}")
