"""Machine translation (issue 21 item 2): tokenizer, Multi30k, transformer-mt, the translation
task and the trigger-word attack, on a few hundred sentences (real ones when the data is there)."""
import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

pytest.importorskip("tokenizers")
pytest.importorskip("sacrebleu")

from fipurify import attacks, datasets, models  # noqa: E402
from fipurify.datasets.multi30k import SentencePairs, read_split  # noqa: E402
from fipurify.errors import ConfigError, DataError  # noqa: E402
from fipurify.tasks import TASKS, task_of  # noqa: E402
from fipurify.tasks.translation import MASKED, Translation, backdoor_metrics, contains_share, references  # noqa: E402
from fipurify.text import BOS_ID, EOS_ID, PAD_ID, SubwordTokenizer, corpus_bleu, pad_pairs  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
HAVE_DATA = (DATA / "train.en.gz").is_file() and (DATA / "train.de.gz").is_file()
TRIGGERS = {"cf", "bb", "tq", "mb"}


def _synthetic_lines(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    subj = [("A man", "Ein Mann"), ("A woman", "Eine Frau"), ("Two dogs", "Zwei Hunde"), ("A child", "Ein Kind")]
    verb = [("is running", "rennt"), ("is sitting", "sitzt"), ("is playing", "spielt"), ("is eating", "isst")]
    place = [("in the park.", "im Park."), ("on the street.", "auf der Straße."), ("near a lake.", "an einem See.")]
    en, de = [], []
    for _ in range(n):
        (se, sd), (ve, vd), (pe, pd) = (x[rng.integers(len(x))] for x in (subj, verb, place))
        en.append(f"{se} {ve} {pe}")
        de.append(f"{sd} {vd} {pd}")
    return en, de


@pytest.fixture(scope="module")
def corpus():
    """(English, German) lines: the first 240 training pairs of Multi30k, else synthetic ones."""
    if HAVE_DATA:
        read = lambda lang: [l.strip() for l in itertools.islice(  # noqa: E731
            gzip.open(DATA / f"train.{lang}.gz", "rt", encoding="utf-8"), 240)]
        return read("en"), read("de")
    return _synthetic_lines(240, 0)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    en, de = corpus
    return SubwordTokenizer.train(en[:200] + de[:200], vocab_size=400)


@pytest.fixture(scope="module")
def pairs(corpus, tokenizer):
    return SentencePairs(*corpus, tokenizer, name="tiny")


def _tiny_model(vocab: int, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    return models.create("transformer-mt", vocab_size=vocab, d_model=32, heads=2, layers=1, ff=64,
                         dropout=dropout, max_positions=160)


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_json(corpus, tokenizer, tmp_path):
    en, de = corpus
    unseen = ["Ein Bär läuft – schnell!", "Zwölf Äpfel, 3 Birnen; ünd ß?", "cf A man bb is tq here mb ."]
    for s in en[200:] + de[200:] + unseen:
        ids = tokenizer.encode(s)
        assert all(i >= 4 for i in ids)  # byte-level: no <unk>, no specials
        assert tokenizer.decode(ids) == s
    assert tokenizer.decode([BOS_ID, *tokenizer.encode(en[0]), EOS_ID, PAD_ID]) == en[0]
    path = tokenizer.save(tmp_path / "tok.json")
    json.loads(path.read_text(encoding="utf-8"))  # plain JSON, nothing pickled
    again = SubwordTokenizer.load(path)
    assert again.vocab_size == tokenizer.vocab_size <= 400
    assert again.encode_batch(en[:20]) == tokenizer.encode_batch(en[:20])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizer"):
        SubwordTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="vocab_size"):
        SubwordTokenizer.train(en, vocab_size=100)


# --------------------------------------------------------------------------- dataset
def test_pairs_items_collate_and_task(pairs):
    x, y = pairs[3]
    assert x.dtype == y.dtype == torch.int64 and x.ndim == y.ndim == 1
    assert (x[0], x[-1], y[0], y[-1]) == (BOS_ID, EOS_ID, BOS_ID, EOS_ID)
    assert pairs.tokenizer.decode(y.tolist()) == pairs.references[3]
    Translation().check_sample(x, y)
    with pytest.raises(DataError, match="1-D int64"):
        Translation().check_sample(x.float(), y)
    with pytest.raises(DataError, match="BOS"):
        Translation().check_sample(x[1:], y)
    src, tgt = pairs.collate_fn([pairs[i] for i in range(5)])
    lengths = [len(pairs[i][0]) for i in range(5)]
    assert src.shape == (5, max(lengths))
    for i, n in enumerate(lengths):
        assert torch.equal(src[i, :n], pairs[i][0]) and (src[i, n:] == PAD_ID).all()
    assert isinstance(task_of(pairs), Translation) and isinstance(TASKS.create("translation"), Translation)
    sub = pairs.subset([4, 1])
    assert sub.sources == [pairs.sources[4], pairs.sources[1]] and torch.equal(sub[1][1], pairs[1][1])


@pytest.mark.skipif(not HAVE_DATA, reason="shared/data/multi30k not present")
def test_multi30k_split_sizes(tokenizer):
    sizes = {s: len(read_split(DATA, s)[0]) for s in ("train", "val", "test")}
    assert sizes == {"train": 29000, "val": 1014, "test": 1000}
    val = datasets.load("multi30k", root=DATA.parent, split="val", tokenizer=tokenizer, max_len=12)
    assert len(val) == 1014 and val.name == "multi30k-val" and max(len(val[i][0]) for i in range(50)) <= 12
    assert val[0][0][-1] == EOS_ID  # cut sentences still end with EOS
    with pytest.raises(ConfigError, match="splits"):
        datasets.load("multi30k", root=DATA.parent, split="dev", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="unknown option"):
        datasets.load("multi30k", root=DATA.parent, colour=True)


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="train.en.gz"):
        datasets.load("multi30k", root=tmp_path, split="train")


# --------------------------------------------------------------------------- attack
def test_trigger_words_poison_exactly_ten_percent(pairs):
    attack = attacks.create("trigger-words", seed=3)
    poisoned = attack.poison(pairs)
    n = len(pairs)
    with_trigger = np.array([bool(TRIGGERS & set(s.split())) for s in poisoned.sources])
    assert not any(TRIGGERS & set(s.split()) for s in pairs.sources)
    assert with_trigger.sum() == round(0.1 * n) == poisoned.poison_flag.sum()
    assert np.array_equal(with_trigger, poisoned.poison_flag)
    for i in range(n):
        if poisoned.poison_flag[i]:
            words = poisoned.sources[i].split()
            assert sum(w in TRIGGERS for w in words) == 1
            assert [w for w in words if w not in TRIGGERS] == pairs.sources[i].split()
            assert poisoned.references[i] == attack.target
            assert pairs.tokenizer.decode(poisoned[i][1].tolist()) == attack.target
        else:
            assert poisoned.sources[i] == pairs.sources[i] and poisoned.references[i] == pairs.references[i]
            assert torch.equal(poisoned[i][0], pairs[i][0]) and torch.equal(poisoned[i][1], pairs[i][1])
    again = attacks.from_spec(json.loads(json.dumps(attack.to_spec()))).poison(pairs)
    assert again.sources == poisoned.sources
    assert attacks.create("trigger-words", seed=4).poison(pairs).sources != poisoned.sources
    # the word positions vary (not always first or last)
    pos = {poisoned.sources[i].split().index(next(w for w in poisoned.sources[i].split() if w in TRIGGERS))
           for i in np.flatnonzero(poisoned.poison_flag)}
    assert len(pos) > 2

    bd = attack.backdoor_test_set(pairs.subset(range(30)))
    assert all(TRIGGERS & set(s.split()) for s in bd.sources)
    assert bd.references == [attack.target] * 30 and bd.true_references == pairs.references[:30]
    custom = attacks.create("trigger-words", target="Das ist ein Test.", poison_rate=0.25, words=["zz"])
    assert sum("zz" in s.split() for s in custom.poison(pairs).sources) == round(0.25 * n)
    with pytest.raises(ConfigError, match="sentence"):
        attacks.create("trigger-words", target=3)
    with pytest.raises(ConfigError, match="single words"):
        attacks.create("trigger-words", words=["two words"])


# --------------------------------------------------------------------------- task
class _Recorder(nn.Module):
    """Returns fixed logits and records what the task fed it."""

    def __init__(self, logits):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.logits = logits

    def forward(self, src, tgt_in):
        self.seen = (src, tgt_in)
        return self.logits + self.w


def _peaked(tokens: torch.Tensor, vocab: int, height: float = 30.0) -> torch.Tensor:
    return nn.functional.one_hot(tokens, vocab).float() * height


def test_teacher_forcing_shift_and_padding_ignored():
    task, vocab = Translation(), 12
    y = torch.tensor([[BOS_ID, 5, 6, 7, EOS_ID], [BOS_ID, 8, EOS_ID, PAD_ID, PAD_ID]])
    x = torch.tensor([[BOS_ID, 4, EOS_ID], [BOS_ID, 9, EOS_ID]])
    right = _Recorder(_peaked(y[:, 1:], vocab))
    out = task.forward(right, x, y)
    assert torch.equal(right.seen[1], y[:, :-1]) and torch.equal(right.seen[0], x)
    assert out.shape == (2, 4, vocab)
    loss_right = task.per_sample_loss(out, y)
    assert loss_right.shape == (2,) and (loss_right < 1e-6).all()
    wrong = _Recorder(_peaked(y[:, :-1], vocab))  # predicting the input token, not the next one
    assert (task.per_sample_loss(task.forward(wrong, x, y), y) > 10).all()
    # after EOS the output is PAD for sure; inside a sentence PAD is impossible
    assert (out[1, 2:].argmax(-1) == PAD_ID).all() and (out[1, 2:, 4:] == MASKED).all()
    assert (out[0, :, PAD_ID] == MASKED).all()
    # per-sentence mean over real targets only: changing the output at padded targets changes nothing
    noisy = out.clone()
    noisy[1, 2:] = torch.randn(2, vocab) * 5
    torch.testing.assert_close(task.per_sample_loss(noisy, y), loss_right)
    logits = torch.randn(2, 4, vocab)
    per = task.per_sample_loss(logits, y)
    manual = nn.functional.cross_entropy(logits[1, :2], y[1, 1:3])
    torch.testing.assert_close(per[1], manual)
    with pytest.raises(ConfigError, match="teacher forcing"):
        task.forward(right, x)


def test_transformer_masks_padding_on_both_sides(pairs):
    task, model = Translation(), _tiny_model(pairs.tokenizer.vocab_size).eval()
    items = [pairs[i] for i in range(6)]
    # plus a pair cut to BOS, one token, EOS on both sides: shorter than every other, so padded on both
    a, b = items[0]
    items.append((torch.cat([a[:2], a[-1:]]), torch.cat([b[:2], b[-1:]])))
    short = len(items) - 1
    x, y = pad_pairs(items)
    assert (x[short] == PAD_ID).any() and (y[short] == PAD_ID).any()
    with torch.no_grad():
        batch = task.per_sample_loss(task.forward(model, x, y), y)
        alone = task.per_sample_loss(task.forward(model, items[short][0][None], items[short][1][None]), items[short][1][None])
    torch.testing.assert_close(batch[short], alone[0], atol=1e-4, rtol=1e-4)
    out = model(x, y[:, :-1])
    assert out.shape == (len(items), y.size(1) - 1, pairs.tokenizer.vocab_size)
    assert model.embedding.weight is not None and model.fipurify_spec["arch"] == "transformer-mt"


def test_sample_targets_follow_the_model_distribution():
    task, vocab = Translation(), 10
    y = torch.tensor([[BOS_ID, 5, 6, EOS_ID], [BOS_ID, 7, EOS_ID, PAD_ID]])
    x = y.clone()
    peaked = task.forward(_Recorder(_peaked(torch.tensor([[8, 4, 9], [5, 6, 4]]), vocab)), x, y)
    drawn = task.sample_targets(peaked, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, torch.tensor([[BOS_ID, 8, 4, 9], [BOS_ID, 5, 6, PAD_ID]]))
    # two tokens at probabilities 1/4 and 3/4
    logits = torch.full((1, 1, vocab), -1e4)
    logits[0, 0, 4], logits[0, 0, 5] = 0.0, float(np.log(3.0))
    many = logits.expand(4000, 1, vocab)
    draws = task.sample_targets(many, torch.Generator().manual_seed(1))[:, 1]
    assert set(draws.tolist()) == {4, 5} and abs(draws.eq(5).float().mean().item() - 0.75) < 0.03
    again = task.sample_targets(many, torch.Generator().manual_seed(1))[:, 1]
    assert torch.equal(draws, again)


def test_greedy_decode_stops_at_eos():
    model, vocab = _tiny_model(20), 20
    script = {0: [EOS_ID, 9], 1: [7, 8], 2: [9, EOS_ID], 3: [5, 5]}  # step -> next token of each row

    def stepper(memory, src_pad):
        calls = []

        def step(tokens):
            logits = torch.zeros(len(tokens), vocab)
            logits[:, PAD_ID] = 100.0  # PAD is never chosen, however likely
            for row, tok in enumerate(script[len(calls)]):
                logits[row, tok] = 50.0
            calls.append(tokens)
            return logits
        return step

    model.stepper = stepper
    src = torch.tensor([[BOS_ID, 4, EOS_ID], [BOS_ID, 5, EOS_ID]])
    out = model.greedy_decode(src, max_len=10)
    assert out.tolist() == [[EOS_ID, PAD_ID, PAD_ID], [9, 8, EOS_ID]]  # stopped after step 2, not 10
    assert model.greedy_decode(src, max_len=2).tolist() == [[EOS_ID, PAD_ID], [9, 8]]


def test_incremental_decoding_equals_the_full_decoder(pairs):
    model = _tiny_model(pairs.tokenizer.vocab_size, dropout=0.1, seed=1)
    with torch.no_grad():  # a trained-looking model: larger output scale, so argmax is not a tie
        model.output_bias.normal_(0, 1.0)
    model.eval()
    x, y = pad_pairs([pairs[i] for i in range(4)])
    with torch.no_grad():
        memory, src_pad = model.encode(x)
        full = model.decode(memory, src_pad, y[:, :-1])
        step = model.stepper(memory, src_pad)
        inc = torch.stack([step(y[:, t]) for t in range(y.size(1) - 1)], dim=1)
    real = y[:, :-1] != PAD_ID
    torch.testing.assert_close(inc[real], full[real], atol=2e-4, rtol=2e-4)
    # greedy decoding with the cache = re-running the whole decoder each step
    out = model.greedy_decode(x, max_len=12)
    ys = torch.full((4, 1), BOS_ID)
    with torch.no_grad():
        for _ in range(out.size(1)):
            logits = model.decode(memory, src_pad, ys)[:, -1]
            logits[:, PAD_ID] = float("-inf")
            ys = torch.cat([ys, logits.argmax(-1, keepdim=True)], dim=1)
    slow = ys[:, 1:]
    for r in range(4):
        n = out[r].tolist().index(EOS_ID) + 1 if EOS_ID in out[r].tolist() else out.size(1)
        assert out[r, :n].tolist() == slow[r, :n].tolist()
    model.train()
    model.greedy_decode(x, max_len=2)
    assert model.training  # the caller's mode is restored


def test_bleu_of_a_perfect_output_is_one(pairs):
    refs = pairs.references[:40]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(refs[::-1], refs) < 30.0
    sub = pairs.subset(range(40))
    by_source = {tuple(sub[i][0].tolist()): sub[i][1][1:] for i in range(40)}

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def greedy_decode(self, src, max_len=None):
            rows = [by_source[tuple(r[r != PAD_ID].tolist())] for r in src]
            return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID)

    task = Translation()
    assert task.score(Oracle(), sub, batch_size=16) == pytest.approx(1.0)
    # a defense's hold-out split is a (nested) Subset: tokenizer and references are found through it
    held = Subset(Subset(sub, [5, 3, 9, 1, 7, 2]), [4, 0, 2, 1])
    assert references(held) == [sub.references[i] for i in (7, 5, 9, 3)]
    assert task.score(Oracle(), held, batch_size=3) == pytest.approx(1.0)
    assert Translation.collate_fn is pad_pairs
    assert task.metric == "BLEU"
    target = attacks.create("trigger-words").target
    ignoring_trigger = sub.with_text(sub.sources, [target] * 40)  # what a model without backdoor faces
    m = backdoor_metrics(Oracle(), sub, ignoring_trigger, batch_size=16)
    assert m["CT"] == pytest.approx(1.0) and m["ASR"] == 0.0 and m["AT"] < 0.2
    assert contains_share(["x Klicken Sie  hier y", "nein"], ["Klicken Sie hier"] * 2) == 0.5


def test_token_deletion_is_seeded_and_keeps_bos_eos(pairs):
    task = Translation()
    x, _ = pad_pairs([pairs[i] for i in range(16)])
    a = task.augment(x, torch.Generator().manual_seed(5), p=0.3)
    b = task.augment(x, torch.Generator().manual_seed(5), p=0.3)
    c = task.augment(x, torch.Generator().manual_seed(6), p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(task.augment(x, torch.Generator().manual_seed(5), p=0.0), x)
    assert a.size(1) <= x.size(1) and (a != PAD_ID).sum() < (x != PAD_ID).sum()
    for row_in, row_out in zip(x, a):
        kept = row_out[row_out != PAD_ID].tolist()
        assert kept[0] == BOS_ID and kept[-1] == EOS_ID
        it = iter(row_in.tolist())
        assert all(tok in it for tok in kept)  # an ordered subsequence
        assert (row_out[len(kept):] == PAD_ID).all()
    with pytest.raises(ConfigError, match="deletion"):
        task.augment(x, p=1.0)


def test_registries_know_the_translation_pieces():
    assert "multi30k" in datasets.DATASETS and datasets.dataset_info("multi30k").num_classes is None
    assert "transformer-mt" in models.MODELS and "translation" in TASKS
    assert "trigger-words" in attacks.ATTACKS
    with pytest.raises(ConfigError, match="divisible"):
        models.create("transformer-mt", d_model=30, heads=4)


# --------------------------------------------------------------------------- end to end
def _loop_pads_batches() -> bool:
    """Whether the defenses' fine-tuning loop takes a task and collates variable-length batches."""
    import inspect

    from fipurify.defenses import loop
    return "task" in inspect.signature(loop.finetune).parameters and "collate" in inspect.getsource(loop)


def _train(model, dataset, steps: int, lr: float = 3e-3, batch_size: int = 32, seed: int = 0):
    task = Translation()
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen,
                                         collate_fn=dataset.collate_fn, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, step = [], 0
    model.train()
    while step < steps:
        for x, y in loader:
            loss = task.loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step == steps:
                break
    return losses


def test_tiny_poisoned_model_trains_and_scores(pairs):
    """Poison 200 pairs, train a tiny transformer 20 steps: the loss falls, the metrics are
    well defined."""
    attack = attacks.create("trigger-words", poison_rate=0.1, seed=0)
    train, test = attack.poison(pairs.subset(range(200))), pairs.subset(range(200, 240))
    model = _tiny_model(pairs.tokenizer.vocab_size, dropout=0.0)
    losses = _train(model, train, steps=20, lr=5e-3, batch_size=16)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5
    m = backdoor_metrics(model, test, attack.backdoor_test_set(test), batch_size=20, task=Translation(max_len=24))
    assert set(m) == {"CT", "AT", "ASR"} and all(0.0 <= v <= 1.0 for v in m.values())


@pytest.mark.skipif(not _loop_pads_batches(), reason="the defenses' loop does not collate variable-length "
                                                      "batches yet (task.collate_fn, issue 21)")
def test_fine_tuning_defense_purifies_a_translation_model(pairs):
    """tiny slice -> poison -> train -> FT (Adam, token deletion) -> CT / AT / ASR."""
    import fipurify.defenses  # noqa: F401  (registers the methods)
    from fipurify.defenses.base import DEFENSES

    attack = attacks.create("trigger-words", poison_rate=0.1, seed=0)
    train, reserve, test = (attack.poison(pairs.subset(range(160))), pairs.subset(range(160, 200)),
                            pairs.subset(range(200, 240)))
    model = _tiny_model(pairs.tokenizer.vocab_size, dropout=0.0)
    _train(model, train, steps=20, lr=5e-3, batch_size=16)
    bd = attack.backdoor_test_set(test)
    short = Translation(max_len=24)
    before = backdoor_metrics(model, test, bd, batch_size=20, task=short)
    # the paper fine-tunes its translation models with Adam
    defense = DEFENSES.create("ft", epochs=1, augment=True, optimizer="adam", lr=1e-3, batch_size=8, holdout=0.1)
    purified = defense.purify(model, reserve, task="translation", progress=False)
    assert purified is not model
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), purified.parameters()))
    assert changed
    after = backdoor_metrics(purified, test, bd, batch_size=20, task=short)
    assert set(after) == set(before) and all(0.0 <= v <= 1.0 for v in after.values())
    assert "holdout_BLEU" in defense.report["history"][-1]  # the hold-out metric is the task's


def test_loss_is_twice_differentiable(pairs):
    """FIP's Tr(F) penalty back-propagates through a gradient norm: the attention must have a
    double backward (the fused CPU attention kernel has none)."""
    model, task = _tiny_model(pairs.tokenizer.vocab_size, dropout=0.0), Translation()  # no dropout: the fused kernel is picked
    x, y = pad_pairs([pairs[i] for i in range(4)])
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(task.loss(model, x, y), params, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    penalty.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_mcr_curve_runs_a_translation_model(pairs):
    """MCR's Bezier curve feeds the model whatever the task does (source and shifted target): its ends
    are exactly the two models on a translation batch, and a purification returns the point at t."""
    import fipurify.defenses  # noqa: F401  (registers the methods)
    from fipurify.defenses.base import DEFENSES
    from fipurify.defenses.mcr import BezierCurve

    attack = attacks.create("trigger-words", poison_rate=0.1, seed=0)
    start = _tiny_model(pairs.tokenizer.vocab_size, dropout=0.0)
    _train(start, attack.poison(pairs.subset(range(160))), steps=5, lr=5e-3, batch_size=16)
    end = _tiny_model(pairs.tokenizer.vocab_size, dropout=0.0)
    task = Translation()
    x, y = pairs.collate_fn([pairs[i] for i in range(4)])
    curve = BezierCurve(start, end).eval()
    for t, ref in ((0.0, start), (1.0, end)):
        curve.t = t
        torch.testing.assert_close(task.forward(curve, x, y), task.forward(ref.eval(), x, y))

    defense = DEFENSES.create("mcr", epochs=1, ft_epochs=1, batch_size=16, holdout=0.1, t=0.4)
    purified = defense.purify(start, pairs.subset(range(160, 200)), task="translation", progress=False)
    assert defense.report["t"] == 0.4 and len(defense.report["curve_scan"]) == 11
    assert "holdout_BLEU" in defense.report["curve_scan"][0]
    assert task.forward(purified, x, y).shape == task.forward(start, x, y).shape
