"""`vitexport report merge`: one report from several (a host build, runs on devices, runs from other hosts).

Rows are joined, never averaged. An artifact name must mean one artifact: rows of one name with different sha256 are
refused (two builds that happen to share a folder name are different artifacts). Reports must describe the same model
and, where both say, the same evaluation images; otherwise their figures are not comparable and the merge is refused.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..artifacts import output_lock, staged_output
from ..errors import VitexportError
from ..harness import output as _output
from ..harness.report import THIS_HOST, Report, measured_on, now


def _load(path: str) -> Report:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise VitexportError(f"report not found: {path} (pass a report.json or the folder that holds it)")
    try:
        return Report.from_dict(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise VitexportError(f"{p} is not a vitexport report.json ({e.__class__.__name__}: {str(e)[:100]})") from None


def _where(row) -> str:
    return measured_on(row)


def merge(reports: Sequence[Report], names: Sequence[str]) -> Report:
    first = reports[0]
    ident = lambda m: (m.get("source"), m.get("architecture"), m.get("parameters"))  # noqa: E731
    for rep, name in zip(reports[1:], names[1:]):
        if ident(rep.model) != ident(first.model):
            raise VitexportError(f"{name} is about another model ({rep.model.get('source')}) than {names[0]} ({first.model.get('source')}): merge reports of one model")
        a, b = first.evaluation, rep.evaluation
        if a.get("images") and b.get("images") and (a.get("images"), a.get("source")) != (b.get("images"), b.get("source")):
            raise VitexportError(f"{name} was measured on other images ({b.get('images')} from {b.get('source')}) than {names[0]} ({a.get('images')} from {a.get('source')}): its figures are not comparable")
    sha: dict[str, tuple[str, str]] = {}
    seen: dict[tuple[str, str], str] = {}
    rows = []
    for rep, name in zip(reports, names):
        for r in rep.rows:
            if not r.sha256:
                raise VitexportError(f"{name}: row {r.name} has no sha256 (a report from an older vitexport): re-measure it to merge it")
            if r.name in sha and sha[r.name][0] != r.sha256:
                raise VitexportError(f"{r.name} is a different artifact in {name} (sha256 {r.sha256[:12]}) than in {sha[r.name][1]} ({sha[r.name][0][:12]}): rename one of them or merge reports of the same build")
            sha.setdefault(r.name, (r.sha256, name))
            key = (r.name, _where(r))
            if key in seen:
                raise VitexportError(f"{r.name} measured on {_where(r)} is in both {seen[key]} and {name}: merge one of them")
            seen[key] = name
            if r.measured_on is None and rep.host:  # host rows keep the facts of the host that measured them
                r = replace(r, measured_on={"name": THIS_HOST, "facts": dict(rep.host)})
            rows.append(r)
    evaluation = {**first.evaluation, "merged_from": list(names)}
    devices = [d for rep in reports for d in rep.evaluation.get("devices", [])]
    if devices:
        evaluation["devices"] = list(dict.fromkeys(devices))
    return Report(model=first.model, rows=tuple(rows), reference=first.reference, evaluation=evaluation, host=first.host, tools=first.tools, created=now())


def merge_files(paths: Sequence[str], out: str, force: bool = False) -> Report:
    if len(paths) < 2:
        raise VitexportError("give at least two reports to merge")
    reports = [_load(p) for p in paths]  # every input is read and checked before anything is written
    report = merge(reports, [str(p) for p in paths])
    # locked like a build's --out, and renamed into place whole: a failed merge leaves nothing behind
    with output_lock(Path(out)), staged_output(Path(out), force) as tmp:
        _output.write(report, tmp)
    return report
