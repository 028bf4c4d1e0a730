"""Results as text: scalars as `name: value` lines, a mapping of mappings as a table (numbers to 2 decimals)."""


def percent(part: float, whole: int) -> float | None:
    """100 * part / whole, or None for an empty whole."""
    return 100.0 * (part / whole) if whole else None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _is_table(value) -> bool:
    return isinstance(value, dict) and value and all(isinstance(row, dict) for row in value.values())


def _table(rows: dict, indent: str) -> list[str]:
    columns = list(dict.fromkeys(column for row in rows.values() for column in row))
    cells = [["", *columns]]
    cells += [[str(name), *(_cell(row.get(column)) for column in columns)] for name, row in rows.items()]
    widths = [max(len(line[index]) for line in cells) for index in range(len(cells[0]))]
    return [
        indent + "  ".join(cell.ljust(width) if index == 0 else cell.rjust(width) for index, (cell, width) in
                           enumerate(zip(line, widths))).rstrip()
        for line in cells
    ]  # fmt: skip


def render(results: dict, indent: str = "") -> str:
    lines = []
    for name, value in results.items():
        if _is_table(value):
            lines += [f"{indent}{name}:", *_table(value, indent + "  ")]
        elif isinstance(value, dict):
            lines += [f"{indent}{name}:", render(value, indent + "  ")]
        else:
            lines.append(f"{indent}{name}: {_cell(value)}")
    return "\n".join(lines)
