"""hooked_attn.analysis: pattern functions, head scores and the text heatmap, on synthetic patterns whose
answers are known exactly and on tiny random models checked against their cached patterns."""

import math
import re

import pytest
import torch

from conftest import TOL, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn import analysis as A
from hooked_attn.architectures import REGISTRY


def causal_uniform(n: int) -> torch.Tensor:
    """[q_pos k_pos]: each query spreads evenly over itself and every earlier key."""
    allowed = torch.ones(n, n).tril()
    return allowed / allowed.sum(-1, keepdim=True)


def random_causal(*shape: int, seed: int = 0) -> torch.Tensor:
    """[... q_pos k_pos] random softmax rows over the causal keys."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    scores = torch.randn(*shape, n, generator=gen).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf)
    return scores.softmax(-1)


@pytest.fixture(scope="module", params=[("GPT2LMHeadModel", "default"), ("LlamaForCausalLM", "gqa")],
                ids=["gpt2", "llama-gqa"])
def tiny(request) -> HookedTransformer:
    arch, variant = request.param
    return HookedTransformer.from_pretrained_no_processing(tiny_hf_model(REGISTRY[arch].tiny_hf_configs()[variant]))


# -- per-pattern functions ----------------------------------------------------------------------

def test_query_rows_and_top_k():
    pattern = random_causal(2, 3, 6)  # [batch head q_pos k_pos]
    torch.testing.assert_close(A.query_distribution(pattern, 4, head=1, batch=1), pattern[1, 1, 4])
    torch.testing.assert_close(A.query_distribution(pattern, -1, head=-1), pattern[0, 2, 5])
    torch.testing.assert_close(A.query_all_heads(pattern, 3, batch=1), pattern[1, :, 3])
    torch.testing.assert_close(A.query_distribution(pattern[1], 2, head=0), pattern[1, 0, 2])  # unbatched

    tokens = ["a", "b", "c", "d", "e", "f"]
    keys = A.top_k_keys(pattern, 5, head=2, k=3, str_tokens=tokens, batch=1)
    weights, positions = pattern[1, 2, 5].topk(3)
    assert [key.position for key in keys] == positions.tolist()
    assert [key.weight for key in keys] == pytest.approx(weights.tolist())
    assert [key.token for key in keys] == [tokens[p] for p in positions.tolist()]
    assert len(A.top_k_keys(pattern, 1, head=0, k=10)) == 6  # never more keys than there are
    per_head = A.top_k_per_head(pattern, 5, k=2)
    assert len(per_head) == 3
    assert [key.position for key in per_head[1]] == pattern[0, 1, 5].topk(2).indices.tolist()


@pytest.mark.parametrize(("call", "message"), [
    (lambda p: A.query_distribution(p, 6, head=0), r"query=6 is out of range: q_pos has size 6 \(valid: -6..5\)"),
    (lambda p: A.query_distribution(p, -7, head=0), r"query=-7 is out of range"),
    (lambda p: A.query_distribution(p, 0, head=3), r"head=3 is out of range: head has size 3"),
    (lambda p: A.query_all_heads(p, 0, batch=2), r"batch=2 is out of range: batch has size 2"),
    (lambda p: A.top_k_keys(p, 0, head=0, k=0), r"k must be at least 1, got 0"),
    (lambda p: A.top_k_keys(p, 0, head=0, str_tokens=["x"]), r"str_tokens has 1 tokens .* k_pos=6"),
    (lambda p: A.entropy(p[None]),
     r"pattern must be \[batch head q_pos k_pos\] or \[head q_pos k_pos\], got shape \(1, 2, 3, 6, 6\)"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(random_causal(2, 3, 6))


def test_head_and_layer_means(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    _, cache = tiny.run_with_cache(tokens)
    pattern = cache["pattern", 1]
    mean = A.head_mean(pattern)
    torch.testing.assert_close(mean, pattern.mean(1))
    torch.testing.assert_close(mean.sum(-1), torch.ones(2, 7))
    assert A.head_mean(pattern[0]).shape == (7, 7)

    stack = A.stack_patterns(cache)
    assert stack.shape == (tiny.cfg.n_layers, 2, tiny.cfg.n_heads, 7, 7)
    torch.testing.assert_close(stack[1], pattern)
    torch.testing.assert_close(A.layer_mean(cache), (cache["pattern", 0] + cache["pattern", 1]) / 2)
    torch.testing.assert_close(A.layer_mean(stack), stack.mean(0))
    torch.testing.assert_close(A.stack_patterns(cache, layers=[1, 0])[0], pattern)
    with pytest.raises(KeyError, match=r"no pattern for layers \[5\]: blocks.5.attn.hook_pattern"):
        A.stack_patterns(cache, layers=[0, 5])
    with pytest.raises(KeyError, match="holds no attention patterns"):
        A.stack_patterns({"blocks.0.hook_resid_pre": torch.zeros(1, 2, 3)})


def test_entropy():
    n = 6
    uniform = causal_uniform(n)[None]  # [head q_pos k_pos]
    torch.testing.assert_close(A.entropy(uniform), torch.log(torch.arange(1.0, n + 1))[None])
    one_hot = torch.eye(n)[None, None]
    torch.testing.assert_close(A.entropy(one_hot), torch.zeros(1, 1, n))  # masked zeros add nothing
    pattern = random_causal(2, 3, n)
    expected = -(pattern * pattern.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(A.entropy(pattern), expected)


def test_row_sum_check_passes_on_real_patterns_and_names_the_worst_row(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    _, cache = tiny.run_with_cache(tokens)
    for layer in range(tiny.cfg.n_layers):
        check = A.check_row_sums(cache["pattern", layer])
        assert check.ok and check.max_error < 1e-5, str(check)

    broken = cache["pattern", 1].clone()
    broken[1, 2, 4] *= 0.9  # one row sums to 0.9
    check = A.check_row_sums(broken)
    assert not check.ok and check.worst == (1, 2, 4)
    assert check.max_error == pytest.approx(0.1, abs=1e-5) and check.worst_sum == pytest.approx(0.9, abs=1e-5)
    assert str(check).startswith("FAIL") and "batch 1 head 2 query 4" in str(check)

    leaky = causal_uniform(5)[None].clone()
    leaky[0, 1] = torch.tensor([0.4, 0.4, 0.2, 0.0, 0.0])  # sums to 1, but 0.2 on a future key
    check = A.check_row_sums(leaky)
    assert not check.ok and check.worst == (0, 0, 1) and check.worst_masked == pytest.approx(0.2)
    assert A.check_row_sums(leaky, causal=False).ok  # an encoder may look ahead


def test_row_sum_check_with_padding_and_a_kv_cache(tiny):
    tokens = torch.randint(1, tiny.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # left padding
    _, cache = tiny.run_with_cache(tokens, attention_mask=mask)
    pattern = cache["pattern", 0]
    assert A.check_row_sums(pattern, attention_mask=mask).ok
    # Without the mask the padding keys count as attendable: the check still passes (they hold 0),
    # but weight put on a padding key is caught once the mask is given.
    moved = pattern.clone()
    moved[1, 0, 4, 0] += 0.3
    moved[1, 0, 4, 4] -= 0.3
    check = A.check_row_sums(moved, attention_mask=mask)
    assert not check.ok and check.worst == (1, 0, 4) and check.worst_masked == pytest.approx(0.3, abs=1e-5)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch k_pos\] = \(2, 6\), got \(2, 5\)"):
        A.check_row_sums(pattern, attention_mask=mask[:, 1:])

    # Two new queries over five keys (three cached): query i sits at key position i + 3.
    cached = torch.tensor([[0.2, 0.2, 0.2, 0.4, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])[None, None]
    assert A.check_row_sums(cached).ok
    assert A.attendable(2, 5).tolist() == [[[True, True, True, True, False], [True] * 5]]


# -- head scores: synthetic patterns with known answers ----------------------------------------

def test_targets_on_a_small_example():
    tokens = torch.tensor([[5, 6, 7, 5, 6]])
    assert A.previous_token_target(3).tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0]]
    assert A.first_token_target(3).tolist() == [[0, 0, 0], [1, 0, 0], [1, 0, 0]]
    duplicate = A.duplicate_token_target(tokens)[0]
    assert duplicate.nonzero().tolist() == [[3, 0], [4, 1]]  # 5 at 3 repeats 0; 6 at 4 repeats 1
    induction = A.induction_target(tokens)[0]
    assert induction.nonzero().tolist() == [[3, 1], [4, 2]]  # after the earlier 5 came 6; after 6, 7
    assert A.induction_target(torch.tensor([[3, 3, 3]]))[0].nonzero().tolist() == [[2, 1]]  # never k = q


def test_exact_patterns_score_one():
    n = 8
    previous = torch.zeros(n, n)
    previous[0, 0] = 1.0
    previous[torch.arange(1, n), torch.arange(n - 1)] = 1.0
    assert A.pattern_scores(previous[None], A.previous_token_target(n)).tolist() == [1.0]
    # Only query 1's previous token is also the first token.
    assert A.pattern_scores(previous[None], A.first_token_target(n)).item() == pytest.approx(1 / (n - 1))

    sink = torch.zeros(n, n)
    sink[:, 0] = 1.0
    assert A.pattern_scores(sink[None], A.first_token_target(n)).item() == 1.0

    # On uniform causal rows, query q (q >= 1) gives 1 / (q + 1) to each key.
    expected = sum(1 / (q + 1) for q in range(1, n)) / (n - 1)
    assert A.pattern_scores(causal_uniform(n)[None], A.previous_token_target(n)).item() == pytest.approx(expected)


def test_induction_pattern_on_repeated_tokens_scores_one():
    seq_len = 5
    tokens = A.repeated_random_tokens(50, seq_len, batch=3, seed=4)
    n = 2 * seq_len
    induction = torch.zeros(3, 2, n, n)  # [batch head q_pos k_pos]; head 0 induction, head 1 duplicate
    induction[:, :, :seq_len, 0] = 1.0  # the first copy has nothing to look back to: rest on key 0
    for q in range(seq_len, n):
        induction[:, 0, q, q - seq_len + 1] = 1.0
        induction[:, 1, q, q - seq_len] = 1.0
    torch.testing.assert_close(A.pattern_scores(induction, A.induction_target(tokens)), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(A.pattern_scores(induction, A.duplicate_token_target(tokens)), torch.tensor([0.0, 1.0]))
    stacked = torch.stack([induction, induction.flip(1)])  # [layer batch head q_pos k_pos]
    torch.testing.assert_close(A.pattern_scores(stacked, A.induction_target(tokens)),
                               torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_pattern_scores_rejects_bad_shapes():
    pattern = random_causal(2, 3, 5)
    with pytest.raises(ValueError, match="target marks no key"):
        A.pattern_scores(pattern, torch.zeros(5, 5))
    with pytest.raises(ValueError, match=r"target has shape \(3, 5, 5\), but the patterns are batch=2"):
        A.pattern_scores(pattern, torch.ones(3, 5, 5))
    with pytest.raises(ValueError, match="patterns must be"):
        A.pattern_scores(pattern[None, None], torch.ones(5, 5))


def test_repeated_random_tokens():
    tokens = A.repeated_random_tokens(30, 10, batch=3, seed=1, bos_token_id=7)
    assert tokens.shape == (3, 21)
    assert (tokens[:, 0] == 7).all() and not (tokens[:, 1:] == 7).any()
    torch.testing.assert_close(tokens[:, 1:11], tokens[:, 11:])
    assert all(len(set(row.tolist())) == 10 for row in tokens[:, 1:11])
    torch.testing.assert_close(tokens, A.repeated_random_tokens(30, 10, batch=3, seed=1, bos_token_id=7))
    assert not torch.equal(tokens, A.repeated_random_tokens(30, 10, batch=3, seed=2, bos_token_id=7))
    with pytest.raises(ValueError, match=r"seq_len=10 distinct tokens need a larger vocabulary than d_vocab=10"):
        A.repeated_random_tokens(10, 10, bos_token_id=0)


# -- head scores on tiny models, against the cached patterns -----------------------------------

@pytest.mark.parametrize("bos", [None, 0])
def test_model_scores_match_the_cached_stripes(tiny, bos):
    seq_len, batch, seed = 6, 3, 5
    tokens = A.repeated_random_tokens(tiny.cfg.d_vocab, seq_len, batch, seed, bos_token_id=bos)
    _, cache = tiny.run_with_cache(tokens)
    stack = torch.stack([cache["pattern", layer] for layer in range(tiny.cfg.n_layers)])  # [layer batch head q k]
    start = 0 if bos is None else 1  # where the first copy begins
    second = torch.arange(start + seq_len, start + 2 * seq_len)  # the queries of the second copy
    q_all = torch.arange(1, tokens.shape[1])

    kwargs = {"seq_len": seq_len, "batch": batch, "seed": seed, "bos_token_id": bos}
    expected = {
        "induction": stack[:, :, :, second, second - seq_len + 1].mean((1, 3)),
        "duplicate": stack[:, :, :, second, second - seq_len].mean((1, 3)),
        "previous": stack[:, :, :, q_all, q_all - 1].mean((1, 3)),
        "first": stack[:, :, :, q_all, 0].mean((1, 3)),
    }
    got = {
        "induction": A.induction_scores(tiny, **kwargs), "duplicate": A.duplicate_token_scores(tiny, **kwargs),
        "previous": A.previous_token_scores(tiny, **kwargs), "first": A.first_token_scores(tiny, **kwargs),
    }
    for name, value in expected.items():
        assert got[name].shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)
        torch.testing.assert_close(got[name], value, **TOL["tiny_fp32"], msg=name)

    torch.testing.assert_close(A.attention_patterns(tiny, tokens), stack)
    # A user target: the same number as the built-in one, as a tensor or as a function of the tokens.
    torch.testing.assert_close(A.detect_heads(tiny, A.previous_token_target(tokens.shape[1]), tokens),
                               got["previous"], **TOL["tiny_fp32"])
    torch.testing.assert_close(A.detect_heads(tiny, A.induction_target, tokens), got["induction"], **TOL["tiny_fp32"])


def test_detect_heads_on_given_tokens(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    diagonal = torch.eye(9)  # attention to itself
    scores = A.detect_heads(tiny, diagonal, tokens)
    stack = A.attention_patterns(tiny, tokens)
    torch.testing.assert_close(scores, stack.diagonal(dim1=-2, dim2=-1).mean((1, 3)), **TOL["tiny_fp32"])
    with pytest.raises(ValueError, match=r"tokens must be integer ids \[batch pos\]"):
        A.detect_heads(tiny, diagonal, tokens[0])


# -- the text heatmap and the top-k table ---------------------------------------------------------

def grid_rows(text: str) -> dict[int, list[str]]:
    """{query position: its cell characters} from a plain heatmap (a blank cell is ' ').

    Row lines start with the query position (right-aligned, so at most two spaces first); header
    lines are indented past the labels. Cells start where the key-index line (the last header) does.
    """
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if re.match(r"^ {0,2}\d+ \S", line))
    index_line = lines[first - 1]
    start = len(index_line) - len(index_line.lstrip())
    return {int(line.split()[0]): list(line[start::2]) for line in lines[first:]}


def test_text_heatmap_cells_and_labels():
    pattern = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                            [0.55, 0.45, 0.0, 0.0],
                            [0.05, 0.05, 0.9, 0.0],
                            [0.2, 0.3, 0.01, 0.49]])
    text = A.text_heatmap(pattern, ["The", " cat", " sat", "\n"], title="layer 0 head 0")
    lines = text.splitlines()
    assert lines[0] == "layer 0 head 0"
    assert "\x1b" not in text
    assert "␣cat" in text and "⏎" in text  # whitespace made visible
    assert grid_rows(text) == {0: ["9"], 1: ["5", "4"], 2: [".", ".", "9"], 3: ["2", "3", ".", "4"]}
    assert lines[-4].startswith("0 The")
    colored = A.text_heatmap(pattern, color=True).splitlines()
    cell = re.compile(r"\x1b\[38;5;(\d+)m██\x1b\[0m")
    # Colour i of the ramp for weights in [i/10, (i+1)/10): 0.2, 0.3, 0.01 and 0.49 here.
    assert [int(c) for c in cell.findall(colored[-1])] == [A.text.COLOUR_RAMP[i] for i in (2, 3, 0, 4)]
    assert len(cell.findall(colored[-3])) == 2 and colored[-3].endswith("\x1b[0m")  # the future: blank


def test_text_heatmap_truncates_long_prompts():
    n, keep = 50, 10
    pattern = causal_uniform(n)[None, None]  # [batch head q_pos k_pos]
    text = A.text_heatmap(pattern, [f"t{i}" for i in range(n)], max_tokens=keep)
    assert (f"showing the last {keep} of {n} queries and the last {keep} of {n} keys (positions 40..49); "
            "column < is the weight on keys 0..39") in text
    rows = grid_rows(text)
    assert sorted(rows) == list(range(40, 50))
    for q, cells in rows.items():
        dropped = 40 / (q + 1)  # the weight on keys 0..39
        assert cells[0] == str(min(9, int(dropped * 10)))
        assert len([c for c in cells[1:] if c != " "]) == q - 39
    with pytest.raises(ValueError, match="str_tokens has 3 tokens but the pattern has k_pos=50"):
        A.text_heatmap(pattern, ["a", "b", "c"])


def test_top_k_tables():
    pattern = random_causal(1, 3, 6, seed=3)
    tokens = ["a", " b", "c", "d", "e", "f"]
    table = A.top_k_table(pattern, -1, tokens, head=1, k=3)
    lines = table.splitlines()
    assert lines[0] == "top 3 keys for query 5 'f', head 1"
    weights, positions = pattern[0, 1, 5].topk(3)
    for line, position, weight in zip(lines[2:], positions.tolist(), weights.tolist()):
        _, pos, token, shown = line.split()
        assert int(pos) == position and token == tokens[position].replace(" ", "␣")
        assert float(shown) == pytest.approx(weight, abs=5e-5)
    every = A.top_k_table(pattern, 2, tokens, k=2).splitlines()
    assert len(every) == 1 + 3 and every[1].startswith("head  0")
    assert f"{int(pattern[0, 2, 2].argmax())}:" in every[3]


@pytest.mark.real_weights
def test_default_model_has_an_induction_head():
    from hooked_attn.default_model import resolve_default_model

    model = HookedTransformer.from_pretrained_no_processing(resolve_default_model())
    scores = A.induction_scores(model, seq_len=20, batch=4, seed=0)
    assert scores.shape == (30, 9)
    # Measured: 0.857 at L18H6 (and 0.74 at L17H4); random attention over ~30 keys would give ~0.03.
    best = float(scores.max())
    assert best > 0.5, f"best induction score {best:.3f}"
    assert math.isfinite(float(scores.sum()))
