"""The few SVG elements llama.tools.plot draws with, written as text: no plotting library needed."""
import math
from xml.sax.saxutils import escape, quoteattr

CHAR_WIDTH = 7  # px of one 12px sans-serif character, for fitting text into boxes
SMALL_CHAR_WIDTH = 6  # px of one 10px character
HATCH = ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
         'patternTransform="rotate(45)"><rect width="6" height="6" fill="#dddddd"/>'
         '<line x1="0" y1="0" x2="0" y2="6" stroke="#888888" stroke-width="2"/></pattern></defs>')


def element(tag: str, content: str = None, **attributes) -> str:
    """<tag ...>content</tag>; an attribute font_size is written font-size, class_ class, and
    None leaves it out. content is markup (already escaped); attribute values are escaped here."""
    written = "".join(f" {name.rstrip('_').replace('_', '-')}={quoteattr(_value(value))}"
                      for name, value in attributes.items() if value is not None)
    return f"<{tag}{written}/>" if content is None else f"<{tag}{written}>{content}</{tag}>"


def _value(value) -> str:
    """A number to 0.01 px without trailing zeros (28.0 -> "28"), anything else as str()."""
    return f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def text(x: float, y: float, words, **attributes) -> str:
    """A 12px label at (x, y); words are escaped."""
    style = {"font_family": "sans-serif", "font_size": 12, "fill": "#222222", **attributes}
    return element("text", escape(str(words)), x=float(x), y=float(y), **style)


def rect(x: float, y: float, width: float, height: float, fill: str, tooltip: str = None,
         **attributes) -> str:
    content = None if tooltip is None else element("title", escape(tooltip))
    return element("rect", content, x=float(x), y=float(y), width=float(width),
                   height=float(height), fill=fill, **attributes)


def line(x1: float, y1: float, x2: float, y2: float, stroke="#222222", **attributes) -> str:
    return element("line", x1=float(x1), y1=float(y1), x2=float(x2), y2=float(y2),
                   stroke=stroke, **attributes)


def document(width: float, height: float, shapes: list) -> str:
    header = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
              f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">')
    background = element("rect", width="100%", height="100%", fill="white")
    return "\n".join([header, background, *shapes, "</svg>"]) + "\n"


def legend(entries: list, x: float, y: float) -> list:
    """For each (label, fill) a colour square and its label, for (label, colour, "dashed") a
    dashed line's stretch, left to right from (x, y)."""
    shapes = []
    for label, fill, *kind in entries:
        key = line(x, y - 4, x + 12, y - 4, stroke=fill, stroke_width=1.5,
                   stroke_dasharray="4 2") if kind == ["dashed"] else \
            rect(x, y - 10, 12, 12, fill, stroke="#666666", stroke_width=0.5)
        shapes += [key, text(x + 17, y, label, class_="legend")]
        x += 35 + CHAR_WIDTH * len(label)
    return shapes


def nice_ticks(low: float, high: float, count: int = 6, min_spacing: float = 0.0) -> list:
    """Round ticks 1, 2 or 5 times a power of ten apart, from low or below to high or above."""
    if not high > low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    rough = (high - low) / count
    power = 10 ** math.floor(math.log10(rough))
    spacing = max(next(k * power for k in (1, 2, 5, 10) if k * power >= rough * 0.999), min_spacing)
    first, last = math.floor(low / spacing + 1e-9), math.ceil(high / spacing - 1e-9)
    return [index * spacing for index in range(first, last + 1)]


def tick_labels(ticks: list) -> list:
    """The ticks with as many decimals as their spacing needs (0.2 apart: 1, 200 apart: 0)."""
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9))
    return [f"{tick:.{decimals}f}" for tick in ticks]


def x_axis(ticks: list, x, y: float, grid_top: float = None) -> list:
    """Tick marks and labels under a horizontal axis at y (x maps a value to px), and gridlines
    up to grid_top when given."""
    shapes = []
    for tick, label in zip(ticks, tick_labels(ticks)):
        if grid_top is not None:
            shapes.append(line(x(tick), grid_top, x(tick), y, stroke="#dddddd", stroke_width=0.5))
        shapes += [line(x(tick), y, x(tick), y + 5),
                   text(x(tick), y + 18, label, text_anchor="middle")]
    return shapes
