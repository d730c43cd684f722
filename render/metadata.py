"""Generation metadata: the AUTOMATIC1111 infotext and our JSON provenance, in and out of files.

The infotext is the de-facto interchange format of Stable Diffusion tools (A1111's PNG Info,
civitai, ComfyUI importers), so it is written exactly as A1111 >= 1.9 writes it. The
provenance is ours: the complete resolved task, enough for ``--replay`` to re-render.

Where each goes:

- PNG: ``parameters`` text chunk (tEXt, or iTXt when the text is not latin-1; this is what
  A1111 does through Pillow's ``PngInfo.add_text``) and a ``render`` iTXt chunk with the JSON.
- Animations (written by the built-in ``animation`` plugin through these functions): GIF
  the infotext in its comment extension (what sd-webui-animatediff writes and A1111's reader
  takes from ``info["comment"]``) and the provenance in an XMP application extension
  (Adobe's "XMP DataXMP" block, which exiftool reads; Pillow neither writes nor reads XMP
  in a GIF, so ``gif_with_xmp`` and ``_gif_xmp`` do it); animated WebP as a still WebP
  below; MP4 the infotext in the ``comment`` tag and the provenance JSON in ``description``
  (both standard iTunes-style tags the mp4 muxer keeps without ``use_metadata_tags``),
  read with PyAV.
- JPEG/WebP: the infotext in EXIF UserComment, UNICODE-prefixed as piexif writes it (what
  A1111 writes and its readers parse); the provenance in an XMP packet (``render:provenance``),
  because XMP is the one container that JPEG and WebP share, Pillow writes and reads it for
  both, and generic tools (exiftool) show it; a JPEG COM segment does not exist in WebP and
  EXIF has no free-text tag left besides UserComment (MakerNote is vendor-binary).

Pure Python + Pillow: no torch here.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from render import __version__
from render.tasks import Result, Task

#: Keys A1111 writes in this order (``create_infotext`` in A1111's processing.py, v1.9+).
#: A key given in ``extra`` that is one of these goes to its fixed place, as in A1111, where
#: e.g. a hires pass's ``Denoising strength`` sits before ``Clip skip``.
CORE_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed",
    "Face restoration", "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength",
    "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)

NEGATIVE_PREFIX = "Negative prompt:"
PNG_INFOTEXT_KEY = "parameters"
PNG_PROVENANCE_KEY = "render"
PROVENANCE_FORMAT = "render-provenance"
PROVENANCE_SCHEMA = 1
XMP_NS = "https://github.com/render/ns/1.0/"

# A1111's readers accept a key that starts with a word character followed by word
# characters, spaces, '-' or '/'; anything else would break every reader.
_KEY_RE = re.compile(r"\w[\w \-/]+")
_PARAM_KEY = re.compile(r"\s*(\w[\w \-/]+):\s*")
_JSON = json.JSONDecoder()


def format_number(value: Any) -> str:
    """A number as A1111 shows it: integral floats without ``.0`` (``CFG scale: 7``)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(value: str) -> str:
    """Quote a value the way A1111 does, so every A1111-compatible reader gets it back.

    A1111 JSON-quotes a value containing ``,`` ``:`` or a newline. We also quote a value
    containing ``"``, another control character or leading/trailing whitespace: A1111's
    reader unquotes any ``"..."`` value with ``json.loads``, so this costs nothing there and
    makes the round trip exact. A value that already is a JSON string literal (a plugin that
    pre-quoted it, as the ``result_metadata`` example does) is written as it is.
    """
    if _is_json_string(value):
        return value
    if (
        any(c in value for c in ',:"') or value != value.strip()
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        return json.dumps(value, ensure_ascii=False)
    return value


def _is_json_string(value: str) -> bool:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"' or "\n" in value:
        return False
    try:
        return isinstance(json.loads(value), str)
    except ValueError:
        return False


def infotext(
    task: Task,
    *,
    model_name: str,
    model_hash: str,
    vae_name: str | None = None,
    vae_hash: str | None = None,
    extra: Mapping[str, str] | None = None,
    version: str,
    prompt: str | None = None,
) -> str:
    """The A1111 infotext of one task, byte for byte as A1111 would write it.

    ``version`` is written as given (``"render 0.1.0"``). ``extra`` holds the fields of the
    ``result_metadata`` hooks in plugin order (values are strings; see ``quote``). A value of
    ``None`` in ``extra`` drops that field, as in A1111. ``prompt`` replaces the task's prompt
    (the ``infotext_prompt`` hooks add the tags of networks a section added).
    """
    fields: dict[str, str | None] = dict.fromkeys(CORE_ORDER)
    fields["Steps"] = str(task.steps)
    fields["Sampler"] = task.sampler
    fields["Schedule type"] = task.schedule or None
    fields["CFG scale"] = format_number(task.cfg)
    fields["Seed"] = str(task.seed)
    fields["Size"] = f"{task.width}x{task.height}"
    fields["Model hash"] = model_hash or None
    fields["Model"] = model_name or None
    fields["VAE hash"] = vae_hash or None
    fields["VAE"] = vae_name or None
    if task.kind != "txt2img" and task.strength is not None:
        fields["Denoising strength"] = format_number(task.strength)
    if task.clip_skip > 1:
        fields["Clip skip"] = str(task.clip_skip)
    for key, value in (extra or {}).items():
        if key == "Version":
            continue
        fields[key] = None if value is None else str(value)
    fields["Version"] = version or None

    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"infotext field name {key!r} cannot be read back by A1111 readers")
        # A1111 writes a bare key when the value equals it.
        parts.append(key if key == value else f"{key}: {quote(value)}")
    negative = f"\n{NEGATIVE_PREFIX} {task.negative}" if task.negative else ""
    return f"{task.prompt if prompt is None else prompt}{negative}\n{', '.join(parts)}".strip()


def _scan_params(line: str) -> list[tuple[str, str]]:
    """``Key: value, Key: "quoted, value"`` -> pairs; garbage between commas is skipped."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(line)
    while i < n:
        m = _PARAM_KEY.match(line, i)
        if not m:
            comma = line.find(",", i)
            i = n if comma < 0 else comma + 1
            continue
        key, j = m.group(1), m.end()
        if j < n and line[j] == '"':
            try:
                value, end = _JSON.raw_decode(line, j)
            except ValueError:
                value, end = None, j
            if isinstance(value, str) and (end == n or line[end] == ","):
                pairs.append((key, value))
                i = end + 1
                continue
        comma = line.find(",", j)
        end = n if comma < 0 else comma
        pairs.append((key, line[j:end]))
        i = end + 1
    return pairs


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Split an infotext into (prompt, negative prompt, fields), values unquoted.

    Follows A1111's documented format: the last line holds the fields when it has at least
    three ``Key: value`` pairs; the lines before it are the prompt, and from the first line
    starting with ``Negative prompt:`` on, the negative prompt. Unlike A1111's reader we do
    not strip each line, so every prompt ``infotext`` writes comes back exactly, except
    leading whitespace of the whole text (A1111's writer strips it) and a prompt line that
    itself starts with ``Negative prompt:`` (the format cannot express that).
    """
    text = text.strip()
    lines = text.split("\n")
    params: dict[str, str] = {}
    pairs = _scan_params(lines[-1])
    if len(pairs) >= 3:
        params = dict(pairs)
        lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith(NEGATIVE_PREFIX):
            rest = line[len(NEGATIVE_PREFIX):]
            negative_lines = [rest[1:] if rest.startswith(" ") else rest]
        elif negative_lines is None:
            prompt_lines.append(line)
        else:
            negative_lines.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines or []), params


# -- provenance ------------------------------------------------------------------------------
def provenance(
    task: Task,
    *,
    versions: Mapping[str, str],
    device: str,
    timings: Mapping[str, float],
    infotext: str,
) -> dict[str, Any]:
    """The JSON provenance of one output: everything ``--replay`` needs to re-render it.

    ``task`` is ``task.to_json()`` (template, picks, axes, plugin sections, files with full
    sha256); ``sections`` names which top-level task keys are plugin sections; ``kind`` is
    txt2img/img2img/inpaint. The writers take the infotext from here (``"infotext"``).
    """
    return {
        "format": PROVENANCE_FORMAT,
        "schema": PROVENANCE_SCHEMA,
        "task": task.to_json(),
        "kind": task.kind,
        "sections": sorted(task.sections),
        "versions": dict(versions),
        "device": device,
        "timings": dict(timings),
        "infotext": infotext,
    }


def provenance_json(data: Mapping[str, Any]) -> str:
    """Stable, compact-but-readable JSON (UTF-8, keys sorted) for embedding."""
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# -- embedding -------------------------------------------------------------------------------
def png_info(text: str | None, prov: Mapping[str, Any] | None) -> Any:
    """A ``PngInfo`` with ``parameters`` (tEXt, iTXt if not latin-1) and ``render`` (iTXt)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text(PNG_INFOTEXT_KEY, text)  # tEXt, or iTXt when not latin-1: as A1111
    if prov is not None:
        info.add_itxt(PNG_PROVENANCE_KEY, provenance_json(prov))
    return info


def exif_bytes(text: str) -> bytes:
    """EXIF with the infotext in UserComment, UNICODE-prefixed (what A1111 readers parse)."""
    import piexif
    import piexif.helper

    return piexif.dump({
        "Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, "unicode")},
    })


# JPEG carries XMP in one APP1 segment: 65535 - 2 (length) - 29 (namespace header).
_XMP_JPEG_LIMIT = 65504
# and EXIF in one APP1 segment: 65535 - 2 (length).
_EXIF_JPEG_LIMIT = 65533


def xmp_packet(prov: Mapping[str, Any], *, limit: int | None = None) -> bytes:
    """An XMP packet holding the provenance JSON (zlib+base64 when it would not fit)."""
    payload = provenance_json(prov)
    encoding = "json"
    packet = _xmp_wrap(xml_escape(payload), encoding)
    if limit is not None and len(packet) > limit:
        encoding = "zlib+base64"
        packed = base64.b64encode(zlib.compress(payload.encode(), 9)).decode("ascii")
        packet = _xmp_wrap(packed, encoding)
        if len(packet) > limit:
            raise ValueError(
                f"provenance is too large for a JPEG XMP segment ({len(packet)} bytes); "
                "use png or webp"
            )
    return packet


def _xmp_wrap(content: str, encoding: str) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:render="{XMP_NS}">'
        f'<render:provenance render:encoding="{encoding}">{content}</render:provenance>'
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def _provenance_from_xmp(xmp: bytes | str) -> dict[str, Any] | None:
    # Our own element only, found without an XML parser (no entity expansion on input
    # files we did not write); XML's five predefined escapes are all xml_escape produces.
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
    m = re.search(
        r'<render:provenance render:encoding="([^"]*)">(.*?)</render:provenance>', text, re.S
    )
    if not m:
        return None
    encoding, content = m.groups()
    if encoding == "zlib+base64":
        payload = zlib.decompress(base64.b64decode(content)).decode("utf-8")
    else:
        payload = (
            content.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
            .replace("&apos;", "'").replace("&amp;", "&")
        )
    data = json.loads(payload)
    return data if isinstance(data, dict) else None


def save_image(image: Any, path: str | Path, fmt: str, prov: Mapping[str, Any],
               *, quality: int = 92) -> None:
    """Save ``image`` as ``fmt`` (png, webp, jpg) with the infotext and provenance embedded.

    ``prov["infotext"]`` is the infotext. JPEG has no alpha: RGBA/P/LA become RGB.
    """
    text = prov.get("infotext")
    if not isinstance(text, str):
        raise ValueError("provenance has no 'infotext' string; build it with metadata.provenance()")
    fmt = fmt.lower()
    if fmt == "png":
        image.save(path, format="PNG", pnginfo=png_info(text, prov))
        return
    if fmt in ("jpg", "jpeg"):
        if image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
        exif = exif_bytes(text)
        if len(exif) > _EXIF_JPEG_LIMIT:
            raise ValueError(f"infotext too long for JPEG's EXIF segment ({len(text)} "
                             "characters); use png or webp")
        image.save(path, format="JPEG", quality=quality, exif=exif,
                   xmp=xmp_packet(prov, limit=_XMP_JPEG_LIMIT))
        return
    if fmt == "webp":
        image.save(path, format="WEBP", quality=quality, exif=exif_bytes(text),
                   xmp=xmp_packet(prov))
        return
    raise ValueError(f"no metadata writer for format {fmt!r} (png, webp, jpg)")


# -- animations ------------------------------------------------------------------------------
#: Container suffixes read through PyAV (video); everything else is opened with Pillow.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv"})
# Adobe XMP spec part 3, GIF: application extension "XMP Data" + auth code "XMP", the raw
# packet, then a 258-byte "magic trailer" so a GIF reader walking sub-blocks ends on a 0.
_GIF_XMP_HEAD = b"\x21\xff\x0bXMP DataXMP"
_GIF_XMP_TRAILER = b"\x01" + bytes(range(255, -1, -1)) + b"\x00"


def gif_with_xmp(data: bytes, packet: bytes) -> bytes:
    """A GIF's bytes with an XMP application extension holding ``packet`` before its
    trailer (``;``). The packet must hold no NUL byte (an XMP packet of JSON never does)."""
    if not data.endswith(b";"):
        raise ValueError("not a complete GIF (no trailer)")
    if b"\x00" in packet:
        raise ValueError("an XMP packet for a GIF cannot hold a NUL byte")
    return data[:-1] + _GIF_XMP_HEAD + packet + _GIF_XMP_TRAILER + b";"


def _gif_xmp(path: str | Path) -> bytes | None:
    """The XMP packet ``gif_with_xmp`` wrote into a GIF, or None."""
    data = Path(path).read_bytes()
    start = data.rfind(_GIF_XMP_HEAD)
    if start < 0:
        return None
    start += len(_GIF_XMP_HEAD)
    end = data.find(_GIF_XMP_TRAILER, start)
    return data[start:end] if end >= 0 else None


def frame_infotext(text: str, index: int, count: int) -> str:
    """The infotext of frame ``index`` (from 0) of ``count``: the animation's, with a
    ``Frame: 3/16`` field (counted from 1) at the end of its fields line."""
    return f"{text}, Frame: {index + 1}/{count}"


def frame_pnginfo(text: str, prov: Mapping[str, Any], index: int, count: int) -> Any:
    """The PNG chunks of one frame written beside an animation: the frame's infotext as
    ``parameters`` (A1111's PNG Info shows it) and a marker naming the animation's task (the
    ledger's reconcile treats the file as that task's side file, as a ControlNet map)."""
    task = prov.get("task") or {}
    info = extra_pnginfo({k: task.get(k) for k in ("id", "job", "index")},
                         f"frame-{index:04}", frame=index, frames=count)
    info.add_text(PNG_INFOTEXT_KEY, frame_infotext(text, index, count))
    return info


#: PNG text key of the marker on extra outputs (``-control-0.png``, an animation's frames).
EXTRA_KEY = "render-extra"


def extra_pnginfo(of: Mapping[str, Any], suffix: str, **more: Any) -> Any:
    """The PNG chunk that marks an extra output as the task ``of`` (``{id, job, index}``)
    made: the ledger's reconcile then treats the file as that task's side file."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt(EXTRA_KEY, json.dumps({"format": PROVENANCE_FORMAT, "extra": suffix,
                                         **more, "of": dict(of)}))
    return info


def _read_video(path: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    import av  # lazily: only an MP4 needs PyAV

    with av.open(str(path)) as container:
        tags = dict(container.metadata)
    text = tags.get("comment")
    return (str(text) if text else None), _json_mapping(tags.get("description"))


def _json_mapping(raw: Any) -> dict[str, Any] | None:
    """A provenance stored as JSON text: the mapping, or None for anything else."""
    if not isinstance(raw, str):
        return None
    try:
        loaded = json.loads(raw)
    except ValueError:
        return None
    return loaded if isinstance(loaded, dict) else None


def read_metadata(path: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    """(infotext, provenance) from a png, webp (still or animated), jpg, gif or mp4; None for
    what the file lacks. An MP4 is read with PyAV (imported here, lazily)."""
    from PIL import Image

    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        return _read_video(path)
    with Image.open(path) as im:
        info = dict(im.info)
        if im.format == "PNG":
            info.update(getattr(im, "text", {}) or {})  # text chunks after IDAT too
        text = info.get(PNG_INFOTEXT_KEY)
        prov = _json_mapping(info.get(PNG_PROVENANCE_KEY))
        if text is None and "exif" in info:
            text = _user_comment(im)
        if text is None and im.format == "GIF" and info.get("comment"):
            comment = info["comment"]
            text = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else comment
        if prov is None and im.format == "GIF":
            info["xmp"] = _gif_xmp(path)
        if prov is None and info.get("xmp"):
            try:
                prov = _provenance_from_xmp(info["xmp"])
            except (ValueError, zlib.error):
                prov = None
    return (str(text) if text is not None else None), prov


def _user_comment(im: Any) -> str | None:
    import piexif.helper

    try:
        raw = im.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
    except Exception:  # noqa: BLE001 - a broken EXIF block just means no infotext
        return None
    if not raw:
        return None
    if isinstance(raw, str):
        return raw
    try:
        return piexif.helper.UserComment.load(raw)
    except ValueError:
        return raw.decode("utf-8", errors="ignore") or None


def describe_result(result: Result, plugins: Any, versions: dict[str, str],
                    device: str) -> tuple[str, dict[str, Any]]:
    """The infotext and provenance of one result: the prompt as the ``infotext_prompt`` hooks
    complete it, the core's fields, then every plugin's ``result_metadata`` in call order,
    then the render notes (an OOM retry's savers)."""
    task = result.task
    extra: dict[str, str] = {}
    for fields in plugins.hook.result_metadata(task=task, result=result):
        if fields:
            extra.update(fields)
    if result.notes:
        extra["Render notes"] = "; ".join(result.notes)
    model = task.files.get("model")
    vae = task.files.get("vae")
    text = infotext(
        task,
        model_name=Path(model.path).stem if model and not model.hub else task.model,
        model_hash=model.short_hash if model else "",
        vae_name=Path(vae.path).stem if vae else None,
        vae_hash=vae.short_hash if vae else None,
        extra=extra,
        version=f"render {__version__}",
        prompt=plugins.chain("infotext_prompt", "prompt", task.prompt, task=task),
    )
    prov = provenance(task, versions=versions, device=device, timings=result.timings,
                      infotext=text)
    prov["notes"] = list(result.notes)
    if result.executor:   # which worker on which node (the only trace an executor leaves)
        prov["executor"] = dict(result.executor)
    if len(result.images) > 1:   # an animation: what its writer honours, read back by replay
        prov["animation"] = {"frames": len(result.images), "fps": result.fps,
                             "loop": result.loop}
    return text, prov
