"""Calibration statistics streamed layer by layer equal those of a full transformers run of the same model."""

import pytest
import torch

from mobe.architectures import canonical_model_types, get_arch, moe_layout
from mobe.calibrate import CalibrationError, collect_statistics
from mobe.checkpoint import CheckpointReader

ARCHITECTURES = canonical_model_types()


def _reference(path, layout, sequences):
    """Hooks on the experts modules of the whole model: sum of x x^T (and of h h^T) over each expert's tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    ref = {
        layer: {
            "gate": torch.zeros(E, d, d, dtype=torch.float64),
            "down": torch.zeros(E, p, p, dtype=torch.float64),
            "counts": torch.zeros(E, dtype=torch.int64),
        }
        for layer in layout.moe_layers
    }
    handles = []
    for layer in layout.moe_layers:
        module = model.get_submodule(layout.arch.experts_module.format(layer=layer))

        def hook(mod, args, stats=ref[layer]):
            x, index, _ = args
            for e in range(E):
                xe = x[(index == e).any(-1)]
                gate, up = (xe @ mod.gate_up_proj[e].T).chunk(2, dim=-1)
                h = mod.act_fn(gate) * up
                stats["gate"][e] += xe.double().T @ xe.double()
                stats["down"][e] += h.double().T @ h.double()
                stats["counts"][e] += xe.shape[0]

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in sequences:
            model(ids[None])
    return ref


# Not streamed: fused experts, layers that cannot run alone (declared per family), and Ling's q/k/v convolutions,
# which transformers merges into one tensor on load (found from its rules).
REFUSED = {a for a in ARCHITECTURES if get_arch(a).fused is not None or get_arch(a).no_calibration} | {"bailing_hybrid"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_grams_equal_a_full_run(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    reader = CheckpointReader(path)
    layout = moe_layout(reader.config)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 128, (48,), generator=g), torch.randint(0, 128, (13,), generator=g)]
    if arch in REFUSED:
        with pytest.raises(CalibrationError, match="fused|merges it with others|cannot stream") as err:
            dict(collect_statistics(reader, layout, sequences, layout.moe_layers))
        assert "\n" not in str(err.value)
        return
    streamed = dict(collect_statistics(reader, layout, sequences, layout.moe_layers, keep_inputs=True))
    ref = _reference(path, layout, sequences)
    assert sorted(streamed) == list(layout.moe_layers)
    for layer, stats in streamed.items():
        assert torch.equal(stats.counts, ref[layer]["counts"])
        assert torch.equal(stats.mid_factor.counts, ref[layer]["counts"])
        assert stats.counts.sum() == 2 * 61  # top-2 over 61 tokens
        for name in ("gate", "down"):
            a, b = stats.gram(name), ref[layer][name]
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item()), (arch, layer, name)
        assert stats.inputs.shape == (61, layout.hidden_size) and stats.top_k_index.shape == (61, 2)


def test_only_the_wanted_layers_are_measured(qwen3_checkpoint):
    reader = CheckpointReader(qwen3_checkpoint)
    layout = moe_layout(reader.config)
    sequences = [torch.arange(20) % 128]
    all_layers = dict(collect_statistics(reader, layout, sequences, layout.moe_layers))
    last = dict(collect_statistics(reader, layout, sequences, layout.moe_layers, skip={layout.moe_layers[0]}))
    assert list(last) == [layout.moe_layers[-1]]
    assert torch.equal(last[layout.moe_layers[-1]].gram("up"), all_layers[layout.moe_layers[-1]].gram("up"))


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_kept_routing_and_routed_output_equal_a_transformers_forward(tiny_checkpoints, arch):
    """The inputs, expert choices and weights kept for refinement are what the model's own forward passes to its
    experts, and `routed_output` of the dense experts reproduces what the experts module returns."""
    from transformers import AutoModelForCausalLM

    from mobe.calibrate.refine import routed_output

    path = tiny_checkpoints[arch]
    reader = CheckpointReader(path)
    layout = moe_layout(reader.config)
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(5))
    streamed = dict(collect_statistics(reader, layout, [ids], layout.moe_layers, keep_inputs=True))

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seen = {}
    handles = []
    for layer in layout.moe_layers:
        module = model.get_submodule(layout.arch.experts_module.format(layer=layer))

        def hook(mod, args, output, layer=layer):
            seen[layer] = (args[0].reshape(-1, args[0].shape[-1]), args[1], args[2], output, mod)

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(ids[None])
    for h in handles:
        h.remove()
    for layer, stats in streamed.items():
        x, index, weights, output, module = seen[layer]
        torch.testing.assert_close(stats.inputs, x, rtol=1e-5, atol=1e-5)
        assert torch.equal(stats.top_k_index, index)
        torch.testing.assert_close(stats.top_k_weights, weights.float(), rtol=1e-5, atol=1e-6)
        p = layout.intermediate_size
        dense = {
            "gate": module.gate_up_proj[:, :p].detach(),
            "up": module.gate_up_proj[:, p:].detach(),
            "down": module.down_proj.detach(),
        }
        got = routed_output(stats.inputs, stats.top_k_index, stats.top_k_weights, dense, module.act_fn)
        torch.testing.assert_close(got, output.reshape(got.shape), rtol=1e-4, atol=1e-5)


def test_sequential_collection_measures_each_layer_after_the_replaced_ones(qwen3_checkpoint):
    """`collect_sequentially`: handing back the original experts measures what `collect_statistics` does; handing
    back other experts changes only the layers after the replaced one."""
    from mobe.calibrate import collect_sequentially

    reader = CheckpointReader(qwen3_checkpoint)
    layout = moe_layout(reader.config)
    sequences = [torch.arange(40) % 128]
    plain = dict(collect_statistics(reader, layout, sequences, layout.moe_layers))
    seen = {}

    def same(layer, stats):
        seen[layer] = stats
        return {m: layout.read_experts(reader, layer, m) for m in ("gate", "up", "down")}

    collect_sequentially(reader, layout, sequences, same)
    assert sorted(seen) == list(layout.moe_layers)
    for layer in layout.moe_layers:
        torch.testing.assert_close(seen[layer].gram("down"), plain[layer].gram("down"))
    first, later = layout.moe_layers[0], layout.moe_layers[1:]
    changed = {}

    def halve_first(layer, stats):
        changed[layer] = stats
        stacks = {m: layout.read_experts(reader, layer, m) for m in ("gate", "up", "down")}
        return {m: s / 2 for m, s in stacks.items()} if layer == first else stacks

    collect_sequentially(reader, layout, sequences, halve_first)
    torch.testing.assert_close(changed[first].gram("up"), plain[first].gram("up"))
    assert later and all(not torch.allclose(changed[layer].gram("up"), plain[layer].gram("up")) for layer in later)
