"""How byte counts are shown to people (CLI, plan, inspect, errors, cards)."""


def human_size(n: int) -> str:
    """1536 → '1.5 KiB', 5·2³⁰ → '5.00 GiB'."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"
