"""The 50 US states and DC: names, postal codes, and their places on a tile-grid map.

A tile-grid map draws every state as one equal square, placed roughly where the state is (the
layout newsrooms use: NPR's, the Washington Post's), so small states are as visible as large ones.
Rows go from north (0) to south (7), columns from west (0) to east (10); Alaska and Hawaii sit in
the west corners. :func:`state_code` reads a key as a state: its name (any case, extra spaces
ignored, "Washington DC" and "D.C." forms for the District) or its two-letter code.
"""

from __future__ import annotations

import re

#: Postal code -> name, for the 50 states and the District of Columbia.
STATE_NAMES: dict[str, str] = {
    "AL": "Alabama",
    "AK": "Alaska",
    "AZ": "Arizona",
    "AR": "Arkansas",
    "CA": "California",
    "CO": "Colorado",
    "CT": "Connecticut",
    "DE": "Delaware",
    "DC": "District of Columbia",
    "FL": "Florida",
    "GA": "Georgia",
    "HI": "Hawaii",
    "ID": "Idaho",
    "IL": "Illinois",
    "IN": "Indiana",
    "IA": "Iowa",
    "KS": "Kansas",
    "KY": "Kentucky",
    "LA": "Louisiana",
    "ME": "Maine",
    "MD": "Maryland",
    "MA": "Massachusetts",
    "MI": "Michigan",
    "MN": "Minnesota",
    "MS": "Mississippi",
    "MO": "Missouri",
    "MT": "Montana",
    "NE": "Nebraska",
    "NV": "Nevada",
    "NH": "New Hampshire",
    "NJ": "New Jersey",
    "NM": "New Mexico",
    "NY": "New York",
    "NC": "North Carolina",
    "ND": "North Dakota",
    "OH": "Ohio",
    "OK": "Oklahoma",
    "OR": "Oregon",
    "PA": "Pennsylvania",
    "RI": "Rhode Island",
    "SC": "South Carolina",
    "SD": "South Dakota",
    "TN": "Tennessee",
    "TX": "Texas",
    "UT": "Utah",
    "VT": "Vermont",
    "VA": "Virginia",
    "WA": "Washington",
    "WV": "West Virginia",
    "WI": "Wisconsin",
    "WY": "Wyoming",
}

#: The District of Columbia's code: drawn only when the data has it.
DC = "DC"

#: Postal code -> (row, column) of its tile; row 0 is the northernmost, column 0 the westernmost.
TILES: dict[str, tuple[int, int]] = {
    "AK": (0, 0),
    "ME": (0, 10),
    "VT": (1, 9),
    "NH": (1, 10),
    "WA": (2, 0),
    "ID": (2, 1),
    "MT": (2, 2),
    "ND": (2, 3),
    "MN": (2, 4),
    "IL": (2, 5),
    "WI": (2, 6),
    "MI": (2, 7),
    "NY": (2, 8),
    "RI": (2, 9),
    "MA": (2, 10),
    "OR": (3, 0),
    "NV": (3, 1),
    "WY": (3, 2),
    "SD": (3, 3),
    "IA": (3, 4),
    "IN": (3, 5),
    "OH": (3, 6),
    "PA": (3, 7),
    "NJ": (3, 8),
    "CT": (3, 9),
    "CA": (4, 0),
    "UT": (4, 1),
    "CO": (4, 2),
    "NE": (4, 3),
    "MO": (4, 4),
    "KY": (4, 5),
    "WV": (4, 6),
    "VA": (4, 7),
    "MD": (4, 8),
    "DE": (4, 9),
    "AZ": (5, 1),
    "NM": (5, 2),
    "KS": (5, 3),
    "AR": (5, 4),
    "TN": (5, 5),
    "NC": (5, 6),
    "SC": (5, 7),
    "DC": (5, 8),
    "OK": (6, 3),
    "LA": (6, 4),
    "MS": (6, 5),
    "AL": (6, 6),
    "GA": (6, 7),
    "HI": (7, 0),
    "TX": (7, 3),
    "FL": (7, 8),
}

GRID_ROWS = 1 + max(row for row, _ in TILES.values())
GRID_COLUMNS = 1 + max(column for _, column in TILES.values())

_SPACES = re.compile(r"\s+")


def _normal(text: str) -> str:
    return _SPACES.sub(" ", text.replace(".", " ").replace(",", " ")).strip().lower()


_BY_NAME: dict[str, str] = {_normal(name): code for code, name in STATE_NAMES.items()}
_BY_NAME.update(
    {
        _normal(alias): DC
        for alias in ("Washington DC", "Washington, DC", "Washington D.C.", "D.C.", "District of Columbia")
    }
)


def state_code(key: str) -> str | None:
    """The postal code of a key naming a state (or DC) by name or code; None for anything else."""
    text = key.strip()
    if len(text) == 2 and text.upper() in STATE_NAMES:
        return text.upper()
    return _BY_NAME.get(_normal(text))
