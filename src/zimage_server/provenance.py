"""Machine-readable "made by a model" marks for every output: IPTC's digital source type in XMP.

No torch, no HTTP: the routes pick the source type from the call mode, images.py writes the packet
in the same pass as the encoding (PNG iTXt `XML:com.adobe.xmp`, JPEG APP1, WebP `XMP ` chunk).
Streaming previews carry none: they are not outputs.
"""

from __future__ import annotations

import io
from xml.sax.saxutils import quoteattr

from . import __version__

IPTC_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
# Made by a model from a prompt (text-to-image, ControlNet guidance included).
TRAINED_ALGORITHMIC_MEDIA = IPTC_SOURCE_TYPES + "trainedAlgorithmicMedia"
# A capture (the uploaded image) edited with a model: img2img, inpainting, Omni references.
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = IPTC_SOURCE_TYPES + "compositeWithTrainedAlgorithmicMedia"
EDIT_MODES = frozenset({"img2img", "inpaint", "control_inpaint", "omni"})
CREATOR_TOOL = f"zimage-server {__version__}"


def digital_source_type(mode: str) -> str:
    """IPTC's digital source type for a call mode (specs.CallMode)."""
    return COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA if mode in EDIT_MODES else TRAINED_ALGORITHMIC_MEDIA


def xmp_packet(mode: str, model_name: str) -> bytes:
    """An XMP packet: the digital source type, the creator tool, and the model as IPTC's AI system used."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about=""'
        ' xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        ' xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
        f" Iptc4xmpExt:DigitalSourceType={quoteattr(digital_source_type(mode))}"
        f" Iptc4xmpExt:AISystemUsed={quoteattr(model_name)}"
        f" xmp:CreatorTool={quoteattr(CREATOR_TOOL)}/>"
        "</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    ).encode()


# XMP properties `zimage-server inspect` reports, by their namespaces.
XMP_PROPERTIES = {
    "DigitalSourceType": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "AISystemUsed": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "CreatorTool": "http://ns.adobe.com/xap/1.0/",
}
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"


def read_xmp_marks(data: bytes) -> dict[str, str]:
    """The provenance properties of a PNG, JPEG or WebP file's XMP packet (empty when it has none).

    Any file, not only ours: the packet is parsed with defusedxml, and properties are read both as
    attributes (how we write them) and as elements (how other tools may)."""
    from defusedxml import ElementTree
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        packet = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    if not packet:
        return {}
    text = packet.decode("utf-8", "replace") if isinstance(packet, bytes) else packet
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        return {}
    from defusedxml import DefusedXmlException

    try:
        root = ElementTree.fromstring(text[start : end + len("</x:xmpmeta>")])
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}
    found: dict[str, str] = {}
    for description in root.iter(f"{{{RDF}}}Description"):
        for name, namespace in XMP_PROPERTIES.items():
            value = description.get(f"{{{namespace}}}{name}")
            element = description.find(f"{{{namespace}}}{name}")
            if value is None and element is not None:
                value = (element.text or "").strip()
            if value:
                found.setdefault(name, value)
    return found
