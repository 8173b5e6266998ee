"""The study report: one self-contained HTML page comparing training runs (SGD vs SAM ...).

This module only *assembles*: it reads run folders (``config.json``, ``metrics.jsonl``) and the figures and JSON
results that the analysis commands wrote, and lays them out. Figures are embedded as base64 PNGs so the page is
one file that opens offline; the interactive plotly surfaces are linked next to it.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharpscope.errors import SharpscopeError


@dataclass(frozen=True)
class Run:
    """One training run folder, as the report sees it."""

    label: str  # folder name, e.g. "sam"
    path: Path  # the run folder
    config: dict[str, Any]  # config.json (without the environment block)
    environment: dict[str, Any]  # where it ran (versions, device)
    metrics: list[dict[str, Any]]  # metrics.jsonl records, one per epoch

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    @property
    def description(self) -> str:
        c = self.config
        text = f"{c.get('optimizer', '?').upper()}"
        if c.get("optimizer") in ("sam", "asam"):
            text += f" rho={c.get('rho')}" + (f" m={c['m']}" if c.get("m") else "")
        return f"{text}, {c.get('model')} on {c.get('dataset')}, {len(self.metrics)} epochs, seed {c.get('seed')}"


def read_run(path: str | Path) -> Run:
    """Read a run folder written by ``sharpscope train``; one clear error if it is not one."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "metrics.jsonl").is_file():
        raise SharpscopeError(f"{path} is not a training run folder (it needs config.json and metrics.jsonl "
                              "from `sharpscope train --out`)")
    try:
        config = json.loads((path / "config.json").read_text())
        metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SharpscopeError(f"{path}: config.json or metrics.jsonl is not valid JSON ({exc})") from None
    environment = config.pop("environment", {})
    return Run(label=path.resolve().name, path=path, config=config, environment=environment, metrics=metrics)


@dataclass
class Section:
    """A titled part of the report: prose, tables (HTML), figures (PNG paths) and links."""

    title: str
    text: str = ""
    tables: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain HTML table; floats are formatted by the caller."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _embed_png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(path.stem.replace("_", " ").replace("-", " "))
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:0.2em} h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:0.5em;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:0.85em;color:#555;text-align:center}
pre{background:#f7f7f7;padding:0.8em;overflow:auto;font-size:0.85em} .muted{color:#666}
"""


def render_report(title: str, sections: list[Section], *, out_dir: Path, subtitle: str = "") -> str:
    """The whole page as a string. Links are made relative to ``out_dir`` (where the page is written)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p class='muted'>{html.escape(subtitle)}</p>")
    parts.append("<nav><ol>" + "".join(
        f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections)) + "</ol></nav>")
    for index, section in enumerate(sections):
        parts.append(f"<h2 id='s{index}'>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{section.text}</p>")
        parts.extend(section.tables)
        parts.extend(_embed_png(p) for p in section.figures if p.is_file())
        if section.links:
            items = "".join(
                f"<li><a href='{html.escape(_relative(p, out_dir))}'>{html.escape(_relative(p, out_dir))} (interactive)</a></li>"
                for p in section.links if p.exists())
            parts.append(f"<ul>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())
