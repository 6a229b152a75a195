"""Writes docs/specs/kestrel-tide-datasheet.pdf: a 4-page datasheet with a real text layer, one topic per page.

The PDF is committed, so running this needs fpdf2 only when the text below changes:
    python data/make_sample_pdf.py
Output is byte-for-byte reproducible (fixed creation date, no compression of varying data).
"""

from datetime import datetime, timezone
from pathlib import Path

from fpdf import FPDF

OUTPUT = Path(__file__).resolve().parent / "docs" / "specs" / "kestrel-tide-datasheet.pdf"

# One (title, paragraphs) per page; each page holds facts found nowhere else so page citations can be checked.
PAGES = [
    (
        "Kestrel Tide KT-300 Datasheet - Overview",
        [
            "The Kestrel Tide KT-300 is a moored water-quality buoy for lakes, estuaries and coastal waters.",
            "The hull is 620 mm in diameter and made of UV-stabilised polyethylene. The buoy weighs 18.5 kg "
            "without the mooring chain and floats with 240 mm of freeboard.",
            "The buoy is rated IP68 and has been tested to a depth of 10 metres for 72 hours.",
            "Operating temperature range: -10 to +50 degrees Celsius.",
        ],
    ),
    (
        "Sensors and accuracy",
        [
            "Temperature: range -5 to +45 degrees Celsius, accuracy 0.05 degrees Celsius.",
            "Dissolved oxygen (optical luminescence): range 0 to 20 mg/L, accuracy 0.1 mg/L.",
            "pH: range 0 to 14, accuracy 0.02 pH after two-point calibration.",
            "Turbidity (infrared nephelometer, 860 nm): range 0 to 4000 NTU, accuracy 2 percent of reading.",
            "Conductivity (four-electrode cell): range 0 to 100 mS/cm, accuracy 0.5 percent of reading.",
        ],
    ),
    (
        "Power and communications",
        [
            "Power comes from a 20 W monocrystalline solar panel and a 12 Ah lithium iron phosphate battery.",
            "Average power draw at the default ten-minute interval is 0.35 W.",
            "Primary link: LTE-M and NB-IoT with an embedded eSIM. Fallback link: LoRaWAN at 868 MHz (EU) "
            "or 915 MHz (US), with a line-of-sight range of about 8 km to a gateway.",
            "A GPS receiver reports the buoy position every hour and raises a drift alarm when the buoy "
            "moves more than 50 metres from its deployment point.",
        ],
    ),
    (
        "Ordering information",
        [
            "KT-300: Kestrel Tide buoy with all five sensors. List price 4,850 EUR.",
            "KT-300-L: as KT-300 without the LTE-M modem, for LoRaWAN-only sites. List price 4,400 EUR.",
            "KT-DO-CAP: replacement dissolved-oxygen sensing cap. List price 310 EUR.",
            "KT-CAL-KIT: calibration kit with pH 4, pH 7 and 1413 uS/cm standards. List price 95 EUR.",
            "Lead time is six weeks from order for quantities up to 20 buoys.",
        ],
    ),
]


def build_pdf() -> bytes:
    pdf = FPDF(format="A4")
    pdf.set_creation_date(datetime(2026, 1, 15, tzinfo=timezone.utc))
    pdf.set_title("Kestrel Tide KT-300 Datasheet")
    pdf.set_author("Kestrel Instruments Ltd.")
    pdf.set_auto_page_break(auto=False)
    for title, paragraphs in PAGES:
        pdf.add_page()
        pdf.set_font("Helvetica", style="B", size=16)
        pdf.multi_cell(0, 10, title, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(4)
        pdf.set_font("Helvetica", size=11)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 6, paragraph, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    return bytes(pdf.output())


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_bytes(build_pdf())
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")
