"""Small GTK pieces shared by the dialog and the management window."""

from __future__ import annotations

from gi.repository import Gtk

from spectrumd.desktop.model import instance_colour, printable


def paint(widget: Gtk.Widget, name: str, padding: str = "0") -> None:
    """Give ``widget`` the instance's colour as background, with white text."""
    colour = instance_colour(name)
    provider = Gtk.CssProvider()
    css = (
        f"* {{ background-color: {colour}; color: #ffffff; border-radius: 4px;"
        f" padding: {padding}; }}"
    )
    provider.load_from_data(css.encode())  # type: ignore[no-untyped-call]  # a gi override
    widget.get_style_context().add_provider(provider, Gtk.STYLE_PROVIDER_PRIORITY_APPLICATION)


def instance_badge(name: str, big: bool = False) -> Gtk.Label:
    """The instance's name on its colour: how the user tells instances apart."""
    label = Gtk.Label(label=printable(name, 80))
    label.set_xalign(0.0)
    if big:
        label.add_css_class("title-2")
    paint(label, name, "4px 10px")
    return label


def colour_chip(name: str) -> Gtk.Widget:
    chip = Gtk.Label(label=" ")
    chip.set_size_request(14, 14)
    paint(chip, name)
    return chip


def key_value_grid(rows: list[tuple[str, str]]) -> Gtk.Grid:
    grid = Gtk.Grid(column_spacing=12, row_spacing=4)
    for i, (key, value) in enumerate(rows):
        k = Gtk.Label(label=key, xalign=1.0)
        k.add_css_class("dim-label")
        v = Gtk.Label(label=value, xalign=0.0, selectable=False, wrap=True)
        v.set_max_width_chars(48)
        grid.attach(k, 0, i, 1, 1)
        grid.attach(v, 1, i, 1, 1)
    return grid
