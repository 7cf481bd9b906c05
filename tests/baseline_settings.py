"""Short settings for the baseline-defense tests (a few epochs on the tiny fixture), shared by their files."""
from fipurify import defenses

FAST = {
    "ft-sam": dict(epochs=2, batch_size=32),
    "fp": dict(epochs=1, batch_size=32),
    "nad": dict(epochs=2, teacher_epochs=1, batch_size=32),
    "mcr": dict(epochs=2, ft_epochs=1, batch_size=32),
    "clp": {},
    "anp": dict(epochs=2, batch_size=32),
}


def run_fast(name, tiny, **extra):
    """Purify the tiny fixture's model with ``name`` at its short settings; returns (defense, purified)."""
    d = defenses.create(name, **{**FAST[name], **extra})
    out = d.purify(tiny["model"], tiny["reserve"], progress=False)
    return d, out
