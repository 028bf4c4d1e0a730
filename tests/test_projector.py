"""The projector against an independent reference of the original formula (tokenpacker.testing)."""

import pytest
import torch

from tokenpacker import TokenPackerConfig, TokenPackerProjector

from tokenpacker.testing import OriginalTokenPacker, load_original_projector


def projector_pair(vision_size, levels, width, heads, text_size, scale_factor, grid):
    config = TokenPackerConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=vision_size,
            num_hidden_layers=levels + 1,
            num_attention_heads=2,
            intermediate_size=8,
            image_size=grid * 2,
            patch_size=2,
        ),
        text_config=dict(model_type="llama", hidden_size=text_size, num_attention_heads=2, vocab_size=64),
        multi_level_feature_layers=list(range(1, levels + 1)),
        scale_factor=scale_factor,
        projector_hidden_size=width,
        projector_num_heads=heads,
        slice_separator_token_id=5,
    )
    original = OriginalTokenPacker(vision_size, levels, width, heads, text_size, scale_factor, grid).randomize()
    projector = load_original_projector(TokenPackerProjector(config), original)
    return projector.eval(), original.eval()


@pytest.mark.parametrize("scale_factor", [2, 3, 4])
def test_matches_original_formula_at_the_real_grid(scale_factor):
    # The real 24x24 grid and 8 heads, narrow channels; batch of 3 crops.
    projector, original = projector_pair(64, 4, 64, 8, 96, scale_factor, 24)
    x, x_multi = torch.randn(3, 576, 64), torch.randn(3, 576, 256)
    with torch.no_grad():
        ours, reference = projector(x, x_multi), original(x, x_multi)
    assert ours.shape == (3, (24 // scale_factor) ** 2, 96)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_generalizes_to_other_widths_levels_heads_and_grids():
    projector, original = projector_pair(48, 2, 40, 5, 24, 6, 12)
    x, x_multi = torch.randn(2, 144, 48), torch.randn(2, 144, 96)
    with torch.no_grad():
        torch.testing.assert_close(projector(x, x_multi), original(x, x_multi), atol=1e-5, rtol=0)


def test_each_token_depends_only_on_its_own_region():
    projector, _ = projector_pair(16, 2, 16, 2, 16, 3, 12)
    x, x_multi = torch.randn(1, 144, 16), torch.randn(1, 144, 32)
    with torch.no_grad():
        base = projector(x, x_multi)
        changed = x_multi.clone().view(1, 12, 12, 32)
        changed[0, 3:6, 6:9] += 1.0  # region (1, 2) of the 4x4 coarse grid
        moved = projector(x, changed.view(1, 144, 32))
    differs = (moved - base).abs().amax(-1)[0].view(4, 4) > 0
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(differs, expected)


def test_bfloat16_stays_close_to_float32():
    projector, _ = projector_pair(64, 4, 64, 8, 96, 2, 24)
    x, x_multi = torch.randn(2, 576, 64), torch.randn(2, 576, 256)
    with torch.no_grad():
        full = projector(x, x_multi)
        half = projector.to(torch.bfloat16)(x.bfloat16(), x_multi.bfloat16())
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_gradients_match_the_original_formula():
    # The key and value projections act through the query; training must see the original's gradients.
    projector, original = projector_pair(32, 2, 32, 4, 48, 3, 12)
    x, x_multi = torch.randn(2, 144, 32), torch.randn(2, 144, 64)
    target = torch.randn(2, 16, 48)
    ((projector(x, x_multi) - target) ** 2).sum().backward()
    ((original(x, x_multi) - target) ** 2).sum().backward()
    grads = {name: p.grad for name, p in original.named_parameters()}
    ours = {name: p.grad for name, p in projector.named_parameters()}
    in_proj_weight, in_proj_bias = grads["clip_attn.in_proj_weight"].chunk(3), grads["clip_attn.in_proj_bias"].chunk(3)
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(ours[f"attention.{name}.weight"], in_proj_weight[index], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(ours[f"attention.{name}.bias"], in_proj_bias[index], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours["key_proj.linear_1.weight"], grads["k_proj_1.0.weight"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours["value_norm.weight"], grads["ln_v_1.weight"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours["query_proj.weight"], grads["q_proj_1.weight"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours["output_proj.linear_1.weight"], grads["mlp.0.weight"], atol=1e-3, rtol=1e-4)
