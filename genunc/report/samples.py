"""One sample of an export as HTML, by the export's format: an image tile (png), an RDKit 2D
depiction with its properties (sdf), or a completion whose tokens are coloured by their mutual
information (json).  Only the samples the page shows are read, so the page's size does not
grow with the export's."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: properties of a molecule record shown under its depiction, when present
MOLECULE_PROPERTIES = ("n_atoms", "smiles", "valid", "molecule_stable", "atom_stable_fraction")


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else html.escape(str(value))


def image_tile(path: Path, record: Mapping[str, Any], context: dict[str, Any]) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="tile" alt="sample {html.escape(record["sample_id"])}" ' \
           f'src="data:image/png;base64,{data}">'


def molecule_depiction(path: Path, record: Mapping[str, Any], context: dict[str, Any]) -> str:
    """RDKit's 2D depiction of the generated molecule (hydrogens hidden where RDKit can), drawn
    even when the molecule does not sanitize: an invalid molecule is what a reader wants to
    see."""
    from rdkit import Chem
    from rdkit.Chem import rdDepictor
    from rdkit.Chem.Draw import rdMolDraw2D

    mol = Chem.MolFromMolBlock(path.read_text(), sanitize=False, removeHs=False)
    if mol is None:
        svg = '<p class="note">RDKit could not read this molecule</p>'
    else:
        mol.UpdatePropertyCache(strict=False)
        try:
            mol = Chem.RemoveHs(mol, sanitize=False)
        except Exception:  # noqa: BLE001 - a depiction with its hydrogens is still a depiction
            pass
        rdDepictor.Compute2DCoords(mol)
        drawer = rdMolDraw2D.MolDraw2DSVG(180, 150)
        drawer.drawOptions().clearBackground = False
        drawer.DrawMolecule(mol)
        drawer.FinishDrawing()
        svg = drawer.GetDrawingText()
        svg = svg[svg.index("<svg"):]  # drop the XML declaration: the SVG sits inside HTML
    rows = "".join(f"<tr><th>{name}</th><td>{_value(record[name])}</td></tr>"
                   for name in MOLECULE_PROPERTIES if name in record)
    return f'<div class="molecule">{svg}<table class="props">{rows}</table></div>'


def text_tokens(path: Path, record: Mapping[str, Any], context: dict[str, Any]) -> str:
    """The prompt, then the completion's tokens on a background whose strength is the token's
    mutual information at its commit step, on one scale for the whole page
    (``context["max_token_mi"]``); own-loop and wrapped (diffusers) text exports alike."""
    payload = _payload(path)
    prompt = f'<span class="prompt">{html.escape(str(payload.get("prompt", "")))}</span>'
    tokens = payload.get("token_mutual_information")
    if tokens is None:
        body = html.escape(str(payload.get("completion", "")))
        return f'<p class="text">{prompt}{body}<span class="note"> (no per-token MI)</span></p>'
    if not tokens:  # the completion shows no token (a wrapped pipeline's answer of special tokens)
        return f'<p class="text">{prompt}<span class="note"> (empty completion)</span></p>'
    top = context.get("max_token_mi") or 1.0
    spans = "".join(
        f'<span class="token" style="background: rgba(214, 39, 40, {min(mi / top, 1.0):.3f})" '
        f'title="MI {mi:.3g}" data-mi="{mi!r}">{html.escape(piece)}</span>' if mi is not None
        else f'<span class="token" title="never committed">{html.escape(piece)}</span>'
        for piece, mi in tokens)
    return f'<p class="text">{prompt}{spans}</p>'


def _payload(path: Path) -> dict[str, Any]:
    """What the pipeline returned for the sample (a JSON sample file holds it under ``sample``,
    beside the sample's record)."""
    data = json.loads(path.read_text())
    return data.get("sample", data)


def max_token_mi(paths: list[Path]) -> float:
    """The largest per-token MI among the samples shown (the colour scale's top)."""
    values = [mi for path in paths
              for _, mi in _payload(path).get("token_mutual_information") or [] if mi is not None]
    return max(values, default=0.0) or 1.0


RENDERERS: dict[str, Callable[[Path, Mapping[str, Any], dict[str, Any]], str]] = {
    "png": image_tile, "sdf": molecule_depiction, "json": text_tokens}
