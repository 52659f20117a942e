"""wrap() on torchvision's vit_b_16 (nn.MultiheadAttention) and a timm ViT (its own SDPA calls), random weights.

Run by scripts/ci_extra/65_vision_wrap.sh in a side venv (torchvision cannot share the main one: see
conftest.py). Every attention call is hooked (counted independently), the unhooked output is
bit-identical, and the patterns equal a hand computation from the hooked q and k, whose values in
turn equal the layer's own projection of its input.
"""

import timm
import torch
from torchvision.models import vit_b_16

from hooked_attn import wrap
from tests._sdpa import CountSdpa, hand_pattern


def _outputs_of(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, torch.Tensor], list]:
    """Torch forward hooks that keep each module's output (the attention's input, here)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out))
               for name, m in modules.items()]
    return seen, handles


def _check_q_k_patterns(cache, prefix: str, x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor,
                        n_heads: int) -> None:
    d_model = x.shape[-1]
    q, k = cache[f"{prefix}.hook_q"], cache[f"{prefix}.hook_k"]
    torch.testing.assert_close(q, (x @ w_qkv[:d_model].T + b_qkv[:d_model]).unflatten(-1, (n_heads, -1)))
    torch.testing.assert_close(k, (x @ w_qkv[d_model:2 * d_model].T + b_qkv[d_model:2 * d_model]
                                   ).unflatten(-1, (n_heads, -1)))
    pattern = cache[f"{prefix}.hook_pattern"]
    torch.testing.assert_close(pattern, hand_pattern(q, k))
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))


def test_torchvision_vit_b_16_every_attention_call_is_hooked() -> None:
    torch.manual_seed(0)
    # ViT-B/16 as torchvision builds it (12 layers, 12 heads, d_model 768), on 64x64 images: 16 patches
    # and the class token, to keep the test short.
    model = vit_b_16(image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    blocks = {f"encoder.layers.encoder_layer_{i}": model.encoder.layers[i] for i in range(12)}
    calls = {name: 0 for name in blocks}
    counting = [b.self_attention.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
                for name, b in blocks.items()]
    with torch.no_grad():
        expected = model(x)
    for handle in counting:
        handle.remove()
    assert set(calls.values()) == {1}

    wrapped = wrap(model)
    assert wrapped.attention_paths == [f"{name}.self_attention" for name in blocks]
    attn_inputs, handles = _outputs_of({name: b.ln_1 for name, b in blocks.items()})
    fired: list[str] = []
    with torch.no_grad():
        assert torch.equal(wrapped(x), expected)  # nothing hooked
        out, cache = wrapped.run_with_cache(x)
        wrapped.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"),
                                              lambda t, hook: fired.append(hook.name))])
        assert torch.equal(wrapped(x), expected)  # the hooks are gone again
    for handle in handles:
        handle.remove()
    # Caching takes the explicit path through softmax(q k^T / sqrt(d_head)), so the output is close, not equal.
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert fired == [f"{name}.self_attention.hook_pattern" for name in blocks]
    for layer, name in enumerate(blocks):
        attn = model.encoder.layers[layer].self_attention
        assert cache["pattern", layer].shape == (2, 12, 17, 17)
        _check_q_k_patterns(cache, f"{name}.self_attention", attn_inputs[name], attn.in_proj_weight,
                            attn.in_proj_bias, n_heads=12)


def test_timm_vit_every_sdpa_call_is_hooked() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    assert all(block.attn.fused_attn for block in model.blocks)  # timm's SDPA path (its default)
    x = torch.randn(2, 3, 64, 64)
    counter = CountSdpa()
    with torch.no_grad(), counter:
        expected = model(x)
    assert counter.n == len(model.blocks) == 12

    wrapped = wrap(model)
    attn_inputs, handles = _outputs_of({f"blocks.{i}": b.norm1 for i, b in enumerate(model.blocks)})
    with torch.no_grad():
        out, cache = wrapped.run_with_cache(x)
        assert torch.equal(out, expected)  # caching reads; the kernel's output is kept
        assert torch.equal(wrapped(x), expected)  # nothing hooked
    for handle in handles:
        handle.remove()
    assert wrapped.attention_layers == [f"blocks.{i}.attn" for i in range(12)]
    for layer, block in enumerate(model.blocks):
        assert cache["pattern", layer].shape == (2, 3, 17, 17)
        _check_q_k_patterns(cache, f"blocks.{layer}.attn", attn_inputs[f"blocks.{layer}"], block.attn.qkv.weight,
                            block.attn.qkv.bias, n_heads=3)
