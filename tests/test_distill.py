"""DeiT's distillation token, the distillation losses, the CNN teachers, and a teacher-student run."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import small_run, train_quietly, write_folder_dataset
from torch import nn

from vitcraft import count_parameters, create_model
from vitcraft.augment import Normalization
from vitcraft.cli import main
from vitcraft.config import TrainConfig
from vitcraft.distill import Teacher, distillation_loss
from vitcraft.errors import VitcraftError
from vitcraft.runs import load_model_weights, load_trained_model, save_model
from vitcraft.train import build_optimizer
from vitcraft.variants.cnn import ConvNetForClassification
from vitcraft.variants.deit import DeiTForClassification


def log_probs(logits):
    return logits - logits.exp().sum(1, keepdim=True).log()


def test_hard_distillation_loss_by_hand():
    torch.manual_seed(0)
    cls, dist, teacher = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    rows = torch.arange(5)
    ce_labels = -log_probs(cls)[rows, labels].mean()
    ce_teacher = -log_probs(dist)[rows, teacher.argmax(1)].mean()
    assert distillation_loss(cls, dist, teacher, labels, "hard").item() == pytest.approx(
        0.5 * ce_labels.item() + 0.5 * ce_teacher.item(), rel=1e-6)
    assert distillation_loss(cls, dist, teacher, labels, "hard", alpha=0.2).item() == pytest.approx(
        0.8 * ce_labels.item() + 0.2 * ce_teacher.item(), rel=1e-6)


def test_soft_distillation_loss_by_hand():
    torch.manual_seed(1)
    cls, dist, teacher = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4) * 3
    labels = torch.tensor([0, 1, 2, 3, 0])
    alpha, tau = 0.7, 3.0
    ce_labels = -log_probs(cls)[torch.arange(5), labels].mean()
    p_teacher, log_p_teacher = (teacher / tau).softmax(1), log_probs(teacher / tau)
    log_p_student = log_probs(dist / tau)
    kl = (p_teacher * (log_p_teacher - log_p_student)).sum(1).mean()  # KL(teacher || student) per image
    expected = (1 - alpha) * ce_labels + alpha * tau ** 2 * kl
    assert distillation_loss(cls, dist, teacher, labels, "soft", alpha, tau).item() == pytest.approx(
        expected.item(), rel=1e-5)
    # the student's distillation head agreeing with the teacher leaves only the labels' term
    assert distillation_loss(cls, teacher, teacher, labels, "soft", alpha, tau).item() == pytest.approx(
        (1 - alpha) * ce_labels.item(), rel=1e-5)


def test_soft_targets_with_label_smoothing_by_hand():
    torch.manual_seed(2)
    cls, dist, teacher = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    soft = torch.tensor([[0.7, 0.3, 0, 0], [0, 0, 1.0, 0], [0.5, 0, 0, 0.5]])
    smoothed = soft * 0.9 + 0.1 / 4
    ce_labels = -(smoothed * log_probs(cls)).sum(1).mean()
    ce_teacher = -log_probs(dist)[torch.arange(3), teacher.argmax(1)].mean()  # the teacher's labels: no smoothing
    assert distillation_loss(cls, dist, teacher, soft, "hard", label_smoothing=0.1).item() == pytest.approx(
        0.5 * ce_labels.item() + 0.5 * ce_teacher.item(), rel=1e-6)


def test_deit_averages_its_two_heads_in_both_modes():
    model = create_model("deit-seed-tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert count_parameters(model) == 119_098 + 48 + 48 * 10 + 10 + 48  # token, head, one more position
    x = torch.randn(3, 3, 32, 32)
    for mode in (model.train, model.eval):
        mode()
        (cls, dist), _ = model(x, return_both=True)
        logits, _ = model(x)
        assert cls.shape == dist.shape == (3, 10) and not torch.allclose(cls, dist)
        torch.testing.assert_close(logits, (cls + dist) / 2)
    _, attentions = model(x, output_attentions=True)
    assert attentions[-1].shape == (3, 4, 2 + 64, 2 + 64)
    torch.testing.assert_close(model(x, output_attentions=True)[0], logits)  # the shortcut in the last block
    (cls, dist), _ = model.train()(x, return_both=True)
    dist.sum().backward()  # the distillation head's loss reaches the distillation token
    assert model.embedding.distillation_token.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None
    no_decay = build_optimizer(model, TrainConfig()).param_groups[1]["params"]
    assert any(p is model.embedding.distillation_token for p in no_decay)  # like [CLS]: no weight decay


def test_cnn_teachers_have_the_vit_interface():
    resnet = create_model("resnet18-cifar")
    assert count_parameters(resnet) == 11_173_962
    assert resnet.stem[0].kernel_size == (3, 3) and resnet.stem[0].stride == (1, 1)
    assert resnet.stem(torch.zeros(1, 3, 32, 32)).shape == (1, 64, 32, 32)  # no downsampling in the stem
    small = create_model("cnn-small", num_classes=3)
    logits, attentions = small(torch.randn(2, 3, 32, 32), output_attentions=True)
    assert logits.shape == (2, 3) and attentions is None
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, H, W\), got \(2, 1, 32, 32\)"):
        small(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="resnet18 has a fixed width of 64"):
        create_model("resnet18-cifar", width=32)


def test_cnn_gradient_checkpointing_gives_the_same_gradients():
    a = create_model("cnn-small", width=8)
    b = create_model("cnn-small", width=8)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 16, 16)
    for model in (a, b):
        model(x)[0].logsumexp(1).sum().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)



def test_cnn_runs_channels_last_with_the_same_logits_and_a_loadable_state_dict(tmp_path):
    model = create_model("cnn-small", width=8).eval()
    conv = model.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # the same weights in the default NCHW layout, run by plain modules: the reference
    reference = create_model("cnn-small", width=8).eval().to(memory_format=torch.contiguous_format)
    reference.load_state_dict(model.state_dict())
    assert reference.stem[0].weight.is_contiguous()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)
    # safetensors needs contiguous tensors: saving and loading a channels-last model round trips
    save_model(tmp_path, model, {})
    loaded = create_model("cnn-small", width=8).eval()
    load_model_weights(tmp_path, loaded)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])

class Echo(nn.Module):
    """A stand-in teacher whose logits are its input's first pixel, to see what it receives."""

    def forward(self, x):
        return x[:, :, 0, 0], None


def test_teacher_sees_its_own_normalisation_and_size():
    student_norm, teacher_norm = Normalization((0.5,) * 3, (0.5,) * 3), Normalization((0.4, 0.5, 0.6), (0.2,) * 3)
    pixels = torch.rand(2, 3, 8, 8)
    teacher = Teacher(Echo(), teacher_norm, student_norm, image_size=4)
    got = teacher.logits(student_norm(pixels))
    expected = teacher_norm(F.interpolate(pixels, size=(4, 4), mode="bilinear", antialias=True))[:, :, 0, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class DtypeProbe(nn.Module):
    """A stand-in teacher that records the dtype its linear layer computes in."""

    def __init__(self):
        super().__init__()
        self.linear, self.seen = nn.Linear(3, 2), []

    def forward(self, x):
        out = self.linear(x.mean(dim=(-2, -1)))
        self.seen.append(out.dtype)
        return out, None


def test_teacher_runs_in_its_own_precision_whatever_the_students():
    norm = Normalization((0.5,) * 3, (0.5,) * 3)
    x = torch.randn(2, 3, 8, 8)
    fp32_teacher = Teacher(DtypeProbe(), norm, norm, image_size=8)
    bf16_teacher = Teacher(DtypeProbe(), norm, norm, image_size=8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 student
        assert fp32_teacher.logits(x).dtype == torch.float32
        bf16_teacher.logits(x)
    bf16_teacher.logits(x)  # an fp32 student
    assert fp32_teacher.model.seen == [torch.float32]
    assert bf16_teacher.model.seen == [torch.bfloat16, torch.bfloat16]


@pytest.fixture(scope="module")
def folder16(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("distill") / "data", per_class=(16, 4), size=16)


@pytest.fixture(scope="module")
def teacher_run(folder16, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    train_quietly(small_run(folder16, out.parent, "cnn-small", {"width": 8}, epochs=3, grad_checkpointing=True), out)
    return out


def test_teacher_trains_and_student_distils_end_to_end(folder16, teacher_run, tmp_path, capsys):
    teacher, metadata = load_trained_model(teacher_run)
    assert isinstance(teacher, ConvNetForClassification) and metadata["preset"] == "cnn-small"
    records = [json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    out = tmp_path / "student"
    assert main(["train", "--data", str(folder16), "--preset", "deit-seed-tiny", "--teacher", str(teacher_run),
                 "--distillation", "soft", "--distill-alpha", "0.7", "--distill-tau", "2", "--epochs", "2",
                 "--batch-size", "16", "--threads", "1", "--model-arg", "hidden_size=32",
                 "--model-arg", "intermediate_size=64", "--mixup-alpha", "0.8", "--out", str(out),
                 "--no-figures", "--no-tensorboard"]) == 0
    capsys.readouterr()
    saved = json.loads((out / "run.json").read_text())["run"]["train"]
    assert (saved["teacher"], saved["distillation"], saved["distill_alpha"]) == (str(teacher_run), "soft", 0.7)
    student, _ = load_trained_model(out)
    assert isinstance(student, DeiTForClassification)
    x = torch.randn(2, 3, 16, 16)
    (cls, dist), _ = student(x, return_both=True)
    torch.testing.assert_close(student(x)[0], (cls + dist) / 2)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 * 3 and 0 <= last["test_acc"] <= 1


def test_a_plain_vit_distils_through_its_one_head(folder16, teacher_run, tmp_path):
    run = small_run(folder16, tmp_path, epochs=1, teacher=str(teacher_run))
    assert train_quietly(run, tmp_path / "kd")["step"] == 3


def test_teacher_of_other_classes_or_missing_is_a_clear_error(teacher_run, tmp_path, capsys):
    other = write_folder_dataset(tmp_path / "other", per_class=(4, 2), size=16, classes=("cat", "dog", "fox"))
    args = ["train", "--data", str(other), "--preset", "deit-seed-tiny", "--out", str(tmp_path / "s"),
            "--threads", "1", "--no-figures", "--no-tensorboard"]
    assert main([*args, "--teacher", str(teacher_run)]) == 2
    err = capsys.readouterr().err
    assert "vitcraft: error: the teacher" in err and "was trained on the classes ['bottom', 'middle', 'top'], " \
           "but this data has ['cat', 'dog', 'fox']" in err
    assert main([*args, "--teacher", str(tmp_path / "nothing")]) == 2
    assert f"run directory {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s" / "model.safetensors").exists()
    assert main([*args, "--distillation", "soft"]) == 2
    assert "distillation settings (--distillation, --distill-alpha, --distill-tau) need a teacher" \
        in capsys.readouterr().err
    with pytest.raises(VitcraftError, match="distillation must be one of hard, soft; got 'medium'"):
        TrainConfig(distillation="medium")
    with pytest.raises(VitcraftError, match="distill_alpha must be in"):
        TrainConfig(distill_alpha=1.5)


def test_attention_maps_of_deit_skip_both_prefix_tokens_and_cnns_have_none():
    from vitcraft.attention_maps import maps_for_images

    model = create_model("deit-seed-tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    _, maps = maps_for_images(model, x, "cls")
    _, attentions = model(x, output_attentions=True)
    torch.testing.assert_close(maps, attentions[-1].mean(1)[:, 0, 2:].reshape(2, 8, 8))
    _, rollout = maps_for_images(model, x, "rollout")
    torch.testing.assert_close(rollout.sum((1, 2)), torch.ones(2))
    with pytest.raises(ValueError, match="attention maps are not available for ConvNetForClassification"):
        maps_for_images(create_model("cnn-small"), x, "cls")
