"""The custom ONNX node of `--attention plugin` exports: its PyTorch semantics and its export."""

import onnx
import pytest
import torch

from bitdance_rt.attention.onnx_node import DOMAIN, OP_TYPE, onnx_translation_table, plugin_kv_attention
from bitdance_rt.attention.plain import kv_attention_ref


def case(seed, s=2, hq=4, hkv=2, t=3, d=8, slots=10, lens=(4, 7)):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s, hq, t, d, generator=gen)
    kn, vn = (torch.randn(s, hkv, t, d, generator=gen) for _ in range(2))
    kc, vc = (torch.randn(s, hkv, slots, d, generator=gen) for _ in range(2))
    for b, n in enumerate(lens):  # unused slots are garbage: the node must not read them
        kc[b, :, n:] = float("nan")
        vc[b, :, n:] = float("nan")
    return q, kn, vn, kc, vc, torch.tensor(lens)


@pytest.mark.parametrize("mode", ["block", "causal"])
def test_node_semantics_match_reference(mode):
    q, kn, vn, kc, vc, lens = case(1)
    out = plugin_kv_attention(q, kn, vn, kc, vc, lens, mode)
    before = kc.clone()
    # the reference writes its cache; give it room for the new tokens
    kc2 = torch.cat([kc, torch.zeros_like(kc[:, :, :3])], 2)
    vc2 = torch.cat([vc, torch.zeros_like(vc[:, :, :3])], 2)
    ref = kv_attention_ref(q, kn, vn, kc2, vc2, lens, mode)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kc, before, equal_nan=True)  # the node never writes the cache


def test_node_without_cache_is_plain_attention():
    q, kn, vn, _, _, _ = case(2)
    out = plugin_kv_attention(q, kn, vn, None, None, None, "causal")
    rep = lambda x: x.repeat_interleave(2, dim=1)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(q, rep(kn), rep(vn), is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_export_emits_the_documented_node():
    pytest.importorskip("onnxscript")

    class Step(torch.nn.Module):
        def forward(self, q, kn, vn, kc, vc, lens):
            return plugin_kv_attention(q, kn, vn, kc, vc, lens, "block") + 1

    q, kn, vn, kc, vc, lens = case(3)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    program = torch.onnx.export(Step().eval(), (q, kn, vn, kc, vc, lens), dynamo=True,
                                custom_translation_table=onnx_translation_table(),
                                opset_version=18)
    model = program.model_proto
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == 1 and nodes[0].domain == DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["mask_mode"] == 0 and attrs["plugin_namespace"] == b"bitdance"
    assert abs(attrs["scale"] - 8 ** -0.5) < 1e-6
    assert (DOMAIN, 1) in [(o.domain, o.version) for o in model.opset_import]
    onnx.checker.check_model(model, full_check=True)


def test_block_step_exports_with_plugin_nodes(tiny_ckpt, tmp_path):
    """`--attention plugin`: the LLM graph carries one custom node per layer, passes the
    checker, and computes what the standard graph computes (node run in PyTorch)."""
    pytest.importorskip("onnxscript")
    from bitdance_rt.checkpoint import load_checkpoint
    from bitdance_rt.export import block_step
    from bitdance_rt.export.attention import attention_translations
    from bitdance_rt.export.common import OPSET, export_onnx

    model = load_checkpoint(tiny_ckpt)
    gdef = block_step.graph_def(model, "plugin")
    files = export_onnx(gdef, tmp_path, OPSET, attention_translations("plugin"))
    proto = onnx.load(str(tmp_path / files[0]))
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert len(nodes) == model.spec.llm.num_hidden_layers
    onnx.checker.check_model(str(tmp_path / files[0]), full_check=True)
    standard = block_step.graph_def(model, "standard")
    with torch.no_grad():
        a = gdef.module(*gdef.example.values())
        b = standard.module(*standard.example.values())
    assert len(a) == len(b) == len(gdef.outputs)
    for name, x, y in zip(gdef.outputs, a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
