"""gblr.distill: a compressed student learns to reproduce its teacher, at no more FLOPs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gblr
from gblr.learning import gblr_layers
from gblr.recipes.distill import lr_factor, token_kl
from gblr.recipes.sentences import generated_sentences, split_sentences
from gblr.recipes.text import embedding_fidelity, token_batches


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


def mlp_teacher(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.5), nn.Linear(64, 32)).eval()


def svd_student(teacher: nn.Sequential, ratio: float) -> nn.Sequential:
    """A copy of the teacher with its linears replaced by truncated SVDs (full-width blocks)."""
    student = copy.deepcopy(teacher)
    for index in (0, 3):
        linear = student[index]
        student[index] = gblr.svd_decompose(linear.weight, ratio, bias=linear.bias)
    return student


def data(count: int = 4, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 32, generator=generator) for _ in range(count)]


class FlopsRecorder:
    """A loss that also records each layer's FLOPs when it is called (after the previous step)."""

    def __init__(self, model: nn.Module, loss: str = "cosine") -> None:
        self.layers = gblr_layers(model)
        self.seen: list[list[int]] = []
        self.loss = loss

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        self.seen.append([layer.flops() for layer in self.layers])
        if self.loss == "mse":
            return torch.nn.functional.mse_loss(student, teacher)
        return 1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1).mean()


def test_distill_reduces_the_loss_and_raises_fidelity_of_a_compressed_mlp():
    teacher = mlp_teacher()
    student = svd_student(teacher, 0.25)
    batches, held_out = data(), data(2, seed=7)
    teacher_state = {key: value.clone() for key, value in teacher.state_dict().items()}
    start_flops = [layer.flops() for layer in gblr_layers(student)]
    before = embedding_fidelity(student, teacher, held_out)
    losses = gblr.distill(student, teacher, batches, 120, lr=3e-3, loss="mse", progress=False)
    assert len(losses) == 120 and all(isinstance(value, float) for value in losses)
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    after = embedding_fidelity(student, teacher, held_out)
    assert after > before + 0.005, (before, after)
    # The teacher is untouched and still in eval mode; the student keeps its mode too.
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key
    assert not teacher.training and not student.training
    assert all(parameter.grad is None for parameter in teacher.parameters())
    # Deployable as trained: sigma None, FLOPs not above the start.
    assert all(layer.sigma is None for layer in gblr_layers(student))
    assert all(new <= old for new, old in zip([layer.flops() for layer in gblr_layers(student)], start_flops))
    x = held_out[0]
    with torch.no_grad():
        frozen = gblr.freeze_(copy.deepcopy(student))
        torch.testing.assert_close(frozen(x), student(x), atol=1e-5, rtol=1e-5)


def test_structure_moves_but_no_layer_ever_costs_more_than_at_the_start():
    teacher = mlp_teacher()
    torch.manual_seed(3)
    # Partial-width blocks at random places, sharp masks: widths are free to grow, and a large
    # structural learning rate pushes them.
    student = nn.Sequential(gblr.GBLRLinear(32, 64, sigma=5.0), nn.GELU(), nn.Dropout(0.5),
                            gblr.GBLRLinear(64, 32, sigma=5.0)).train()
    layers = gblr_layers(student)
    start_flops = [layer.flops() for layer in layers]
    structure = [p.detach().clone() for layer in layers for p in layer.structural_parameters()]
    recorder = FlopsRecorder(student, loss="mse")
    losses = gblr.distill(student, teacher, data(), 60, lr=3e-3, struct_lr=5e-2, loss=recorder, progress=False)
    assert losses[-1] < losses[0]
    recorder.seen.append([layer.flops() for layer in layers])
    for flops in recorder.seen:
        assert all(now <= start for now, start in zip(flops, start_flops)), (flops, start_flops)
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(
        [p for layer in layers for p in layer.structural_parameters()], structure))
    assert moved > 0.02  # the structure did train
    assert all(layer.sigma is None for layer in layers)
    for layer in layers:
        widths, locations = layer.in_width.detach(), layer.in_location.detach()
        assert float(widths.min()) >= 0 and float(widths.max()) <= 1
        assert float(locations.min()) >= 0 and float(locations.max()) < 1
    assert student.training  # mode restored


def test_frozen_structure_stays_exactly_put():
    teacher = mlp_teacher()
    torch.manual_seed(4)
    student = nn.Sequential(gblr.GBLRLinear(32, 64), nn.GELU(), nn.Dropout(0.5), gblr.GBLRLinear(64, 32)).eval()
    layers = gblr_layers(student)
    structure = [p.detach().clone() for layer in layers for p in layer.structural_parameters()]
    content = [p.detach().clone() for layer in layers for p in layer.content_parameters()]
    losses = gblr.distill(student, teacher, data(2), 20, lr=1e-2, train_structure=False, progress=False)
    assert losses[-1] < losses[0]
    for parameter, saved in zip([p for layer in layers for p in layer.structural_parameters()], structure):
        assert torch.equal(parameter.detach(), saved)
        assert parameter.requires_grad  # restored
    assert any(not torch.equal(p.detach(), q) for p, q in zip(
        [p for layer in layers for p in layer.content_parameters()], content))


def test_distill_a_tiny_bert_on_sentence_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")
    del transformers
    from fixtures import tiny_bert, tiny_tokenizer

    tokenizer = tiny_tokenizer(tmp_path)
    teacher = tiny_bert(tokenizer)
    student = copy.deepcopy(teacher)
    batches = token_batches(tokenizer, generated_sentences(64), batch_size=16)
    held_out = token_batches(tokenizer, generated_sentences(32, seed=1), batch_size=16)
    gblr.convert_(student, gblr.GBLRConfig(flops_ratio=0.5, method="svd"), calibration=batches, progress=False,
                  verbose=False)
    start_flops = gblr.flops_report(student).gblr_macs
    before = embedding_fidelity(student, teacher, held_out)
    first_batch = embedding_fidelity(student, teacher, batches[:1])
    losses = gblr.distill(student, teacher, batches, 40, lr=1e-3, progress=False)  # default: pooled, cosine
    after = embedding_fidelity(student, teacher, held_out)
    assert before < 0.95 and after > before + 0.01, (before, after)
    assert min(losses[-4:]) < losses[0]
    # the default loss is 1 - the mean cosine of the mean-pooled outputs: 1 - fidelity, before the first step
    assert losses[0] == pytest.approx(1 - first_batch, abs=1e-5)
    assert gblr.flops_report(student).gblr_macs <= start_flops
    # Only the GBLR layers trained: the rest is still the teacher's (so save_pretrained keeps it all).
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert torch.equal(student.encoder.layer[0].output.LayerNorm.weight, teacher.encoder.layer[0].output.LayerNorm.weight)
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_a_time_limit_makes_the_bar_count_seconds(monkeypatch):
    # with only a time limit the step count is a loose upper bound: a bar over it would show
    # an ETA of months; it counts seconds instead, up to the limit, the step in its postfix
    import gblr.recipes.distill as distill_module

    made = []

    class Recorder:
        def __init__(self, total, description, enabled, *, unit="it"):
            self.total, self.unit, self.n, self.postfix = total, unit, 0, {}
            made.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **values):
            self.postfix = values

        def close(self):
            pass

    monkeypatch.setattr(distill_module, "progress_bar", Recorder)
    teacher = mlp_teacher()
    student = svd_student(teacher, 0.5)
    losses = gblr.distill(student, teacher, data(1), 1_000_000, max_seconds=1.2)
    (bar,) = made
    assert bar.unit == "s" and bar.total == 1 and 0 <= bar.n <= bar.total
    assert bar.postfix["step"] == len(losses)
    gblr.distill(student, teacher, data(1), 3)  # bounded by steps: a bar of steps
    assert made[1].unit == "it" and made[1].total == 3 and made[1].n == 3


def test_time_limit_and_errors():
    teacher = mlp_teacher()
    student = svd_student(teacher, 0.5)
    losses = gblr.distill(student, teacher, data(1), 10_000, max_seconds=0.3, progress=False)
    assert 0 < len(losses) < 10_000
    with pytest.raises(ValueError, match="steps"):
        gblr.distill(student, teacher, data(1), 0)
    with pytest.raises(ValueError, match="same module"):
        gblr.distill(teacher, teacher, data(1), 1)
    with pytest.raises(ValueError, match="empty"):
        gblr.distill(student, teacher, [], 1)
    with pytest.raises(ValueError, match="loss must be one of"):
        gblr.distill(student, teacher, data(1), 1, loss="kld")
    with pytest.raises(ValueError, match="max_seconds"):
        gblr.distill(student, teacher, data(1), 1, max_seconds=0)
    with pytest.raises(ValueError, match="no GBLR layers"):
        gblr.distill(mlp_teacher(1), teacher, data(1), 1)
    dense = mlp_teacher(1)
    losses = gblr.distill(dense, teacher, data(1), 5, lr=1e-2, train_all=True, progress=False)
    assert losses[-1] < losses[0]


def test_learning_rate_warms_up_over_the_first_twentieth_of_the_run_by_steps_or_by_time():
    # by steps: 1000 steps warm up over 50, then a cosine to zero
    assert lr_factor(0, 1000) == pytest.approx(1 / 50)
    assert lr_factor(24, 1000) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.024)))
    assert lr_factor(500, 1000) == pytest.approx(0.5)
    assert lr_factor(10**6, 1000) == pytest.approx(0.0)
    assert lr_factor(99, 10**6) == pytest.approx(1.0, abs=1e-6)  # at most 100 warm-up steps
    # by time, the step count a mere upper bound: warm after 5 % of the time, not after 100 steps
    cosine = 0.5 * (1 + math.cos(0.02 * math.pi))
    assert lr_factor(3, 10**6, elapsed=2.0, max_seconds=100.0) == pytest.approx(0.4 * cosine)
    assert lr_factor(6, 10**6, elapsed=10.0, max_seconds=100.0) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))
    assert lr_factor(50, 10**6, elapsed=100.0, max_seconds=100.0) == pytest.approx(0.0)
    # whichever bound is nearer leads: 90 % of the steps at 10 % of the time
    assert lr_factor(900, 1000, elapsed=1.0, max_seconds=10.0) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))


def test_an_error_mid_run_restores_flags_and_modes():
    teacher = mlp_teacher()
    student = svd_student(teacher, 0.5).train()
    student[0].in_width.requires_grad_(False)  # a flag the caller chose stays as it was

    def failing(student_out, teacher_out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gblr.distill(student, teacher, data(1), 5, loss=failing, train_structure=False, progress=False)
    assert student.training and not teacher.training
    assert not student[0].in_width.requires_grad
    assert all(p.requires_grad for name, p in student.named_parameters() if name != "0.in_width")


def test_a_non_finite_step_is_refused_naming_the_layer():
    # A NaN gradient used to reach the widths and fail later in flops() without a name.
    teacher = mlp_teacher()
    student = svd_student(teacher, 0.5)

    def nan_loss(student_out, teacher_out):
        return (student_out * float("nan")).sum()

    with pytest.raises(ValueError, match=r"layer '0' \(GBLRLinear\(in_features=32, out_features=64\)\): .* contain "
                                         r"NaN or infinite values after the optimizer step of distillation step 0"):
        gblr.distill(student, teacher, data(1), 3, loss=nan_loss, max_grad_norm=None, progress=False)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        gblr.distill(student, teacher, data(1), 1, max_grad_norm=float("nan"))


@pytest.mark.slow
def test_minilm_at_half_the_flops_keeps_its_embeddings_and_distillation_helps():
    """The real all-MiniLM-L6-v2: 64 calibration sentences, GBLR at 0.5 of the encoder linears."""
    from gblr.recipes.compress import linear_targets
    from gblr.recipes.text import load_sentence_encoder
    from test_text import minilm_path

    teacher, tokenizer = load_sentence_encoder(minilm_path())
    train, held_out = split_sentences(None, 64, 64, seed=0)
    batches = token_batches(tokenizer, train, batch_size=32)
    held_out_batches = token_batches(tokenizer, held_out, batch_size=32)
    student = copy.deepcopy(teacher)
    targets = linear_targets(student)
    assert len(targets) == 36
    report = gblr.convert_(student, gblr.GBLRConfig(flops_ratio=0.5, target_modules=targets), calibration=batches,
                           progress=False, verbose=False)
    assert report.flops_ratio <= 0.5 + 1e-9
    fidelity = embedding_fidelity(student, teacher, held_out_batches)
    assert fidelity > 0.5
    start_flops = [layer.flops() for layer in gblr_layers(student)]
    on_train = embedding_fidelity(student, teacher, batches)
    gblr.distill(student, teacher, batches, 10, lr=1e-4, progress=False)
    assert embedding_fidelity(student, teacher, batches) > on_train
    assert all(now <= start for now, start in zip([layer.flops() for layer in gblr_layers(student)], start_flops))


def test_token_kl_is_the_mean_kl_of_the_next_token_distributions():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 3, 7, generator=generator), torch.randn(2, 3, 7, generator=generator)
    p, q = teacher.softmax(-1), student.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(token_kl(student, teacher), expected)
    assert token_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    # Softmax ignores a shift of the logits: only the distributions count, unlike "mse".
    assert token_kl(teacher + 3.0, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert token_kl(student, teacher).item() > 0.05


def test_kl_distillation_brings_a_compressed_lm_closer_to_its_teacher():
    torch.manual_seed(0)
    vocab = 50
    teacher = nn.Sequential(nn.Embedding(vocab, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, vocab)).eval()
    student = copy.deepcopy(teacher)
    for index in (1, 3):
        student[index] = gblr.svd_decompose(teacher[index].weight, 0.3, bias=teacher[index].bias)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(vocab, (4, 16), generator=generator) for _ in range(4)]
    held_out = torch.randint(vocab, (8, 16), generator=generator)

    def held_out_kl() -> float:
        with torch.no_grad():
            return token_kl(student(held_out), teacher(held_out)).item()

    before = held_out_kl()
    losses = gblr.distill(student, teacher, batches, 80, lr=3e-3, loss="kl", output_fn=lambda m, b: m(b),
                          progress=False)
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    assert held_out_kl() < 0.7 * before, (before, held_out_kl())


def test_teacher_outputs_beyond_the_cache_are_recomputed_with_the_same_result():
    teacher = mlp_teacher()
    batches = data(3)
    runs = {}
    for cache_mb in (2048.0, 64 * 32 * 4 / 2**20, 0.0):  # all batches kept, one kept, none kept
        student = svd_student(teacher, 0.25)
        teacher_calls = []

        def output_fn(model, batch, calls=teacher_calls):
            if model is teacher:
                calls.append(batch)
            return model(batch)

        losses = gblr.distill(student, teacher, batches, 7, lr=1e-3, loss="mse", output_fn=output_fn,
                              teacher_cache_mb=cache_mb, progress=False)
        runs[cache_mb] = (losses, len(teacher_calls))
    assert [calls for _, calls in runs.values()] == [3, 3 + 2, 7]  # 7 steps over 3 batches: 3, 2, 2 uses
    first = next(iter(runs.values()))[0]
    for losses, _ in runs.values():
        assert losses == first
    with pytest.raises(ValueError, match="teacher_cache_mb"):
        gblr.distill(svd_student(teacher, 0.25), teacher, batches, 1, teacher_cache_mb=-1.0)
