"""TransformerLens' patch setters: ``setter(activation, index, clean_activation)`` copies the clean
values at ``index`` (the whole sweep row, layer first) into ``activation`` (one patched variant's
slice of the batch) in place and returns it."""

from torch import Tensor


def layer_pos_patch_setter(act: Tensor, index: tuple[int, ...], clean: Tensor) -> Tensor:
    """``[batch pos d_model]``, index ``(layer, pos)``: patch one position."""
    _, pos = index
    act[:, pos] = clean[:, pos]
    return act


def layer_pos_head_vector_patch_setter(act: Tensor, index: tuple[int, ...], clean: Tensor) -> Tensor:
    """``[batch pos head d_head]``, index ``(layer, pos, head)``: patch one head at one position."""
    _, pos, head = index
    act[:, pos, head] = clean[:, pos, head]
    return act


def layer_head_vector_patch_setter(act: Tensor, index: tuple[int, ...], clean: Tensor) -> Tensor:
    """``[batch pos head d_head]``, index ``(layer, head)``: patch one head at every position."""
    _, head = index
    act[:, :, head] = clean[:, :, head]
    return act


def layer_head_pattern_patch_setter(act: Tensor, index: tuple[int, ...], clean: Tensor) -> Tensor:
    """``[batch head q_pos k_pos]``, index ``(layer, head)``: patch one head's whole pattern."""
    _, head = index
    act[:, head] = clean[:, head]
    return act


def layer_head_pos_pattern_patch_setter(act: Tensor, index: tuple[int, ...], clean: Tensor) -> Tensor:
    """``[batch head q_pos k_pos]``, index ``(layer, head, dest_pos)``: one head's row for one destination."""
    _, head, dest = index
    act[:, head, dest] = clean[:, head, dest]
    return act


def layer_head_dest_src_pos_pattern_patch_setter(act: Tensor, index: tuple[int, ...], clean: Tensor) -> Tensor:
    """``[batch head q_pos k_pos]``, index ``(layer, head, dest_pos, src_pos)``: one entry of one pattern."""
    _, head, dest, src = index
    act[:, head, dest, src] = clean[:, head, dest, src]
    return act
