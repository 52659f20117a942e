"""Switches for what the sublayers read, with TransformerLens' names: split per-head attention inputs, the
MLP's input, ungrouped keys/values.

``set_use_split_qkv_input(True)`` adds ``blocks.{i}.hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` to
every block and makes each head read its own copy of the attention input; ``set_use_hook_mlp_in(True)``
adds ``blocks.{i}.hook_mlp_in``. ``False`` removes the points again, so a model that never asks has the
hook table it always had. ``set_ungroup_grouped_query_attention`` shows grouped keys and values per
query head. None changes the output until a hook edits something.
"""

from typing import Any

from hooked_attn.hook_points import HookPoint, is_hooked

SPLIT_SITES = ("hook_q_input", "hook_k_input", "hook_v_input")
MLP_IN_SITES = ("hook_mlp_in",)


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


class SublayerInputsMixin:
    """For HookedTransformer: its ``blocks`` are TransformerBlocks and its ``hook_dict`` names hook points."""

    blocks: Any
    hook_dict: dict[str, HookPoint]
    mod_dict: dict[str, Any]

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give every head its own copy of its query, key and value inputs, taken before ``ln1``:
        ``blocks.{i}.hook_q_input [batch pos head d_model]``, ``hook_k_input`` / ``hook_v_input``
        ``[batch pos kv_head d_model]`` (``head`` when ungrouped). A hook there changes that head's
        input only. ``ln1`` then normalises each of the three inputs, so its hooks fire three times
        (q, k, v) with a ``head`` axis. ``False`` removes the three points (refused while hooked).

        Raises:
            TypeError: the value is not a bool.
            ValueError: a block adds attention to its norm's output (``block_norms="normed_residual"``),
                or, switching off, one of the points still has hooks (or a spliced SAE).
        """
        _check_flag("use_split_qkv_input", use_split_qkv_input)
        if not all(block.can_split_qkv_input for block in self.blocks):
            raise ValueError("this model's blocks add attention to ln1's output (block_norms='normed_residual'), "
                             "so there is no attention input to split: use_split_qkv_input is not available")
        self._switch_points("use_split_qkv_input", use_split_qkv_input, SPLIT_SITES)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Add ``blocks.{i}.hook_mlp_in [batch pos d_model]``: a copy of what the MLP reads (before ``ln2``),
        so a hook there changes the MLP's input only, never the residual stream. ``False`` removes it.

        Raises:
            TypeError: the value is not a bool.
            ValueError: the model has no MLPs, or its blocks add the MLP to ``ln2``'s output
                (``block_norms="normed_residual"``); switching off, a point still has hooks.
        """
        _check_flag("use_hook_mlp_in", use_hook_mlp_in)
        if not all(block.can_hook_mlp_in for block in self.blocks):
            raise ValueError("hook_mlp_in needs blocks with an MLP that reads a copy of the residual stream; this "
                             "model is attention-only or adds its MLP to ln2's output (block_norms='normed_residual')")
        self._switch_points("use_hook_mlp_in", use_hook_mlp_in, MLP_IN_SITES)

    def _switch_points(self, flag: str, on: bool, sites: tuple[str, ...]) -> None:
        """Set ``flag`` on every block and add (on) or remove (off) its hook points ``sites``; switching
        off is refused, before anything changes, while one of them is hooked or has an SAE spliced in."""
        names = [(block, site, f"blocks.{i}.{site}") for i, block in enumerate(self.blocks) for site in sites]
        if not on:
            busy = [name for block, site, name in names
                    if hasattr(block, site) and (self.hook_dict.get(name) is not getattr(block, site)
                                                 or is_hooked(getattr(block, site)))]
            if busy:
                raise ValueError(f"remove the hooks (or spliced SAEs) on {busy[:3]} before switching {flag} off: "
                                 "their hook points go away")
        for block, site, name in names:
            if on and not hasattr(block, site):
                point = HookPoint()
                setattr(block, site, point)
                point.name = name
                self.hook_dict[name] = self.mod_dict[name] = point
            elif not on and hasattr(block, site):
                delattr(block, site)
                del self.hook_dict[name], self.mod_dict[name]
            setattr(block, flag, on)

    def set_ungroup_grouped_query_attention(self, ungroup_grouped_query_attention: bool) -> None:
        """With grouped-query attention, show keys and values per query head: ``hook_k`` / ``hook_v`` (and
        ``hook_rot_k``, the split ``hook_k_input`` / ``hook_v_input``, the KV cache) get a ``head`` axis,
        each K/V head repeated to the query heads it serves. The output is unchanged. A KV cache filled
        with one setting is refused under the other."""
        _check_flag("ungroup_grouped_query_attention", ungroup_grouped_query_attention)
        for block in self.blocks:
            block.attn.ungroup_grouped_query_attention = ungroup_grouped_query_attention
