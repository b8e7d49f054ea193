"""eval.py's predictor protocol: the chain convention against the data, each measure on predictors
built to be exact representations of the rotations (quaternion multiplication, block-diagonal)
and on a random one against its closed-form expectation, the sign measures with an oracle, the
init reference against a real run's step-0 weights, and the protocol end to end on the toy set."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import baselines
import data
import eval as ev
import sie

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py: small tensors


def latents(n_obj, n_views, seed):
    """(n_obj, n_views, 7) float64 latents with 3DIEBench's angles, U(-π/2, π/2)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-np.pi / 2, np.pi / 2, (n_obj, n_views, 3)),
                           rng.uniform(0, 1, (n_obj, n_views, 4))], -1)


def chains(lat, count, seed=0):
    """chain_transformations of `count` chains of the latents, and the chains."""
    obj, a, b, c = ev.view_chains(lat.shape[0], lat.shape[1], count, seed)
    return ev.chain_transformations(lat, obj, a, b, c, color=False), (obj, a, b, c)


class RightMultiplication(nn.Module):
    """p(z, g) = z g per 4-d block of z (scalar-last quaternions): W(g) is block-diagonal, the
    4 x 4 right-multiplication matrix of g in each block, linear in g like the hypernetwork.
    It maps a view's quaternion q_a to q_a g_ab = q_b: the exact predictor of this data."""

    def forward(self, z, g):
        return data.quaternion_multiply(z.view(len(z), -1, 4), g[:, None, :4]).flatten(1)


class LeftMultiplication(nn.Module):
    """p(z, g) = g z per block: also a representation, of the opposite order."""

    def forward(self, z, g):
        return data.quaternion_multiply(g[:, None, :4], z.view(len(z), -1, 4)).flatten(1)


def view_quaternions(lat):
    """Each view's quaternion from its Euler angles, (N * V, 4): w >= 0 for these angles."""
    return torch.from_numpy(data.euler_xyz_to_quaternion(lat[..., :3])).float().flatten(0, -2)


# ------------------------------------------------------------------ the convention
def test_chains_compose_as_the_quaternion_product_in_the_data(toy_root):
    """g(a→c) = g(a→b) g(b→c) on the toy set's val latents, sign included; g(b→a) = conj g(a→b);
    and right multiplication by g(a→b) takes view a's quaternion to view b's."""
    val = data.Views3DIEBench(toy_root, "val")
    lat = val.latents.reshape(len(val.entries), len(val.view_ids), 7)
    gs, (obj, a, b, _) = chains(lat, 500)
    assert torch.allclose(gs["ac"], data.quaternion_multiply(gs["ab"], gs["bc"]), atol=1e-6)
    assert torch.allclose(gs["ba"], gs["ab"] * torch.tensor([-1.0, -1, -1, 1]), atol=1e-6)
    assert torch.allclose(gs["aa"], torch.tensor([0.0, 0, 0, 1]).expand(500, 4), atol=1e-6)
    q = view_quaternions(lat).view(*lat.shape[:2], 4)
    assert (q[..., 3] >= 0).all()
    assert torch.allclose(RightMultiplication()(q[obj, a], gs["ab"]), q[obj, b], atol=1e-5)
    assert 0 < (gs["ab"][:, 3] < 0).double().mean() < 0.2        # both signs occur


# ------------------------------------------------------------------ exact representations
@pytest.mark.parametrize("blocks", [1, 3])
def test_exact_representation_scores_zero(blocks):
    lat = latents(8, 50, seed=1)
    gs, _ = chains(lat, 64)
    d = 4 * blocks
    z = torch.randn(64, d, generator=torch.Generator().manual_seed(0))
    W, worst, norm, offset = ev.matrix_measures(RightMultiplication(), gs, z, d)
    assert W == pytest.approx(dict(identity=0, composition=0, inverse=0, orthogonality=0),
                              abs=1e-5)
    assert worst < 1e-5 and offset < 1e-6 and norm == pytest.approx(d ** 0.5, rel=1e-5)
    emb = ev.embedding_measures(RightMultiplication(), gs, z, z)
    for key in ("identity", "composition", "inverse", "isometry"):
        assert emb[key] == pytest.approx(0, abs=1e-5), key
    # Left multiplication composes the other way round: it fails the data's order, passes the
    # reversed one, and is exact in everything else.
    W, *_ = ev.matrix_measures(LeftMultiplication(), gs, z, d)
    assert W["composition"] > 0.1
    for key in ("identity", "inverse", "orthogonality"):
        assert W[key] == pytest.approx(0, abs=1e-5), key
    reversed_order = {**gs, "ac": data.quaternion_multiply(gs["bc"], gs["ab"])}
    W, *_ = ev.matrix_measures(LeftMultiplication(), reversed_order, z, d)
    assert W["composition"] == pytest.approx(0, abs=1e-5)


def test_materialise_reads_the_scripts_predictors():
    """W(g) read off the predictions is the hypernetwork's reshape(H g) (row-major); the bias and
    the MLP predictor's offset go to b(g), and both are affine in z; a ReLU MLP is not."""
    torch.manual_seed(0)
    g = torch.randn(5, 4)
    z = torch.randn(5, 8)
    hyper = sie.HypernetPredictor(8, bias=True)
    W, b = ev.materialise(hyper, g, 8)
    assert torch.allclose(W, hyper.hyper(g).view(5, 8, 8), atol=1e-6)
    assert torch.allclose(b, hyper.hyper_bias(g), atol=1e-6)
    assert ev.affine_error(hyper, z, g, W, b) < 1e-5
    mlp = baselines.MLPPredictor(8)
    W, b = ev.materialise(mlp, g, 8)
    assert torch.allclose(W, mlp.weight[:, 4:].expand(5, 8, 8), atol=1e-6)
    assert ev.affine_error(mlp, z, g, W, b) < 1e-5

    class ReluMLP(nn.Module):
        def forward(self, z, g):
            return torch.relu(z + g.sum(1, keepdim=True))
    assert ev.affine_error(ReluMLP(), z, g, *ev.materialise(ReluMLP(), g, 8)) > 0.1


# ------------------------------------------------------------------ a random predictor
def test_random_predictor_matches_its_expected_values():
    """W(g) = Σ_k g_k G_k with G_k iid N(0, σ²), s = d σ²: for a unit g, W(g) is Gaussian, and
    E||W(e) - I||² / d = 1 + s; E||A - BC||² / E||A||² = 1 + s + O(1/d) (no third moments);
    E||BC - I||² / d = 1 + s² + O(1/d); E||WᵀW - I||² / d = s²(2 + 1/d) - 2s + 1 (Wishart);
    |Wz| / |z| = √s (1 + O(1/d)). The means of the square roots match to a few percent at d = 96."""
    d, s = 96, 2.0
    lat = latents(16, 50, seed=2)
    gs, _ = chains(lat, 48)
    z = torch.randn(48, d, generator=torch.Generator().manual_seed(1))
    random_predictor = ev.GaussianPredictor(d, 4, (s / d) ** 0.5, seed=3)
    W, worst, norm, _ = ev.matrix_measures(random_predictor, gs, z, d)
    assert worst < 1e-4 and norm == pytest.approx(d * (s / d) ** 0.5, rel=0.03)
    expected = dict(identity=math.sqrt(1 + s), composition=math.sqrt(1 + s),
                    inverse=math.sqrt(1 + s * s),
                    orthogonality=math.sqrt(s * s * (2 + 1 / d) - 2 * s + 1))
    assert W == pytest.approx(expected, rel=0.05)
    emb = ev.embedding_measures(random_predictor, gs, z, z)
    expected = dict(identity=math.sqrt(1 + s), composition=math.sqrt(1 + s),
                    inverse=math.sqrt(1 + s * s))
    assert {k: emb[k] for k in expected} == pytest.approx(expected, rel=0.06)
    assert emb["isometry"] + 1 == pytest.approx(math.sqrt(s), rel=0.04)     # |Wz| / |z| > 1
    # linear in g, like the hypernetwork: -g gives exactly the opposite prediction
    assert torch.allclose(random_predictor(z, -gs["ab"]), -random_predictor(z, gs["ab"]))


def test_a_zero_predictor_has_no_relative_composition_error():
    """W = 0 (--hypernet-gain 0 at init): ||W(g_ac) - W(g_bc) W(g_ab)|| / ||W(g_ac)|| is 0 / 0:
    undefined (None), while the identity, inverse and orthogonality errors are exactly 1."""
    gs, _ = chains(latents(4, 50, seed=3), 16)
    W, *_ = ev.matrix_measures(ev.GaussianPredictor(8, 4, 0.0, seed=0), gs, torch.ones(16, 8), 8)
    assert W["composition"] is None
    for key in ("identity", "inverse", "orthogonality"):
        assert W[key] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------ q and -q
def test_sign_measures_with_the_exact_predictor():
    """Embeddings = the views' quaternions, predictor = right multiplication: exact for g as the
    data has it, so every target ranks first; -g predicts -q_v, the least similar view (rank V);
    canonicalising g to w >= 0 breaks exactly the queries whose g has w < 0."""
    N, V = 12, 50
    lat = latents(N, V, seed=4)
    emb = view_quaternions(lat)
    g = data.relative_g(np.repeat(lat[:, :1], V, 1), lat, float32_angles=False).reshape(N * V, 4)
    negative = float((g[:, 3] < 0).double().mean())
    assert 0 < negative < 0.5
    mrrs = ev.sign_mrrs(RightMultiplication(), emb, g, V, CPU, 64)
    assert mrrs == pytest.approx(dict(mrr_g=1, mrr_minus_g=1 / V,
                                      mrr_canonical_g=1 - negative + negative / V,
                                      mrr_w_neg=1, mrr_w_neg_flipped=1 / V), abs=1e-6)


# ------------------------------------------------------------------ the init reference
def recording(module, monkeypatch):
    """Make module.build_model keep a copy of the first predictor it builds (the training
    harness's step-0 model)."""
    built, real = [], module.build_model

    def build_model(args):
        model = real(args)
        built.append(copy.deepcopy(model.predictor.state_dict()))
        return model
    monkeypatch.setattr(module, "build_model", build_model)
    return built


@pytest.mark.parametrize("module, flags", [
    (sie, ["--hypernet-gain", "official", "--seed", "3"]),
    (baselines, ["--method", "equimod-vicreg", "--seed", "1"])])
def test_init_reference_is_the_real_step_0_predictor(module, flags, toy_root, tmp_path,
                                                     monkeypatch):
    """A real run (1 epoch, 2 steps) records its step-0 predictor; the checkpoint's probeable,
    loaded by eval.py, rebuilds exactly that predictor as its init reference, without moving the
    caller's random states."""
    built = recording(module, monkeypatch)
    run_dir = tmp_path / "run"
    module.main(["--data-root", toy_root, "--epochs", "1", "--batch-size", "8", "--no-eval",
                 "--run-dir", str(run_dir), *flags])
    probe, _ = ev.load_probeable(str(run_dir), CPU)
    state = torch.get_rng_state(), np.random.get_state()[1].copy()
    init = probe.predictor_init().state_dict()
    assert torch.equal(state[0], torch.get_rng_state())
    assert np.array_equal(state[1], np.random.get_state()[1])
    assert init.keys() == built[0].keys()
    for key, value in built[0].items():
        assert torch.equal(init[key], value), key
    assert not torch.equal(probe.predict.state_dict()["hyper.weight"], init["hyper.weight"])


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("module, flags", [
    (sie, ["--hypernet-gain", "official"]), (sie, ["--predictor", "mlp", "--rot-color"]),
    (baselines, ["--method", "equimod-simclr"])])
def test_protocol_writes_its_fields_and_figure(module, flags, toy_root, tmp_path):
    """An untrained model built as at step 0: the protocol writes each measure with chance_init
    and chance_random, chance_init equal to the value (the init reference is the same predictor),
    and predictor.png next to retrieval.png."""
    args = module.parse_args(["--data-root", toy_root, *flags])
    probe = module.probeable(ev.model_at_init(module.build_model, args), args)
    out = tmp_path / "out"
    res = ev.evaluate(probe, toy_root, protocols=("predictor", "retrieval"), out_dir=str(out))
    saved = json.loads((out / "eval.json").read_text())
    records = [r for r in saved["metrics"] if r["protocol"] == "predictor"]
    keys = {f"{r['name']}/{r['part']}" for r in records}
    assert {"rep_identity/z", "rep_composition/z", "rep_inverse/z", "rep_isometry/z",
            "rep_prediction_error/z", "w_negative/queries", "w_negative/pairs", "mrr_g/embedding",
            "mrr_minus_g/embedding", "mrr_canonical_g/embedding"} <= keys
    assert {"rep_identity/W", "rep_composition/W", "rep_inverse/W", "rep_orthogonality/W"} <= keys
    summary = res["summary"]
    assert summary["mrr_g/embedding"] == pytest.approx(summary["mrr/embedding"])
    for r in records:
        assert {"chance_init", "chance_random"} <= set(r) and r["definition"] and r["n"] > 0
        assert math.isfinite(r["value"])
        if not r["name"].startswith("w_negative"):
            assert r["chance_init"] == pytest.approx(r["value"], abs=1e-6), r
            assert math.isfinite(r["chance_random"])
    if "--predictor" in flags:                 # Linear([g; z]): affine, W(g) constant
        assert any("offset" in n for n in saved["notes"])
    png = (out / "predictor.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "retrieval.png").exists()


def test_a_zero_predictor_at_init_leaves_out_what_is_undefined(toy_root, tmp_path):
    """The toy preset starts from W(g) = 0: evaluated untrained, its relative measures (against
    |W(g_ac)|, and cosines of zero predictions) are undefined and named in one note; the rest and
    the figure are there."""
    args = sie.parse_args(["--data-root", toy_root, "--hypernet-gain", "0"])
    probe = sie.probeable(ev.model_at_init(sie.build_model, args), args)
    res = ev.evaluate(probe, toy_root, protocols=("predictor",), out_dir=str(tmp_path))
    note = next(n for n in res["notes"] if n.startswith("predictor: the trained predictor"))
    for key in ("rep_composition/W", "rep_composition/z", "mrr_g/embedding"):
        assert key in note and key not in res["summary"]
    assert res["summary"]["rep_identity/W"] == pytest.approx(1.0)        # |0 - I| / |I|
    assert res["summary"]["rep_isometry/z"] == pytest.approx(1.0)
    assert (tmp_path / "predictor.png").exists()


def test_protocol_is_skipped_without_a_predictor(toy_root):
    """A model without a predictor (VICReg): a note next to the other protocols; asked for alone,
    an error (there would be nothing to evaluate)."""
    args = baselines.parse_args(["--data-root", toy_root, "--method", "vicreg"])
    probe = baselines.probeable(baselines.build_model(args), args)
    assert probe.predict is None and probe.predictor_init is None
    res = ev.evaluate(probe, toy_root, protocols=("predictor", "classify"), epochs=1, hidden=8)
    assert {r["protocol"] for r in res["metrics"]} == {"classify"}
    assert any(n.startswith("predictor skipped") for n in res["notes"])
    with pytest.raises(ValueError, match="measures the model's predictor"):
        ev.evaluate(probe, toy_root, protocols=("predictor",))
