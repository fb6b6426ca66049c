
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from vitcraft.augment import BatchAugment, Normalization, random_horizontal_flip, resized_crop, sample_crop_boxes


def test_resized_crop_matches_torchvision_per_image():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    boxes = torch.tensor([[0, 0, 32, 32], [2, 3, 28, 29], [4, 0, 28, 30], [0, 4, 30, 28],
                          [1, 1, 30, 31], [5, 2, 27, 29]], dtype=torch.float)
    ours = resized_crop(images, boxes, (32, 32))
    for image, box, out in zip(images, boxes.int().tolist(), ours):
        top, left, h, w = box
        reference = TF.resized_crop(image, top, left, h, w, [32, 32], antialias=False)
        # grid_sample samples at the same points as bilinear resize (align_corners=False);
        # it only differs at the border, where torchvision clamps the source index
        torch.testing.assert_close(out[:, 1:-1, 1:-1], reference[:, 1:-1, 1:-1], atol=2e-2, rtol=0)
    torch.testing.assert_close(ours[0], images[0], atol=1e-6, rtol=0)  # the full box is the identity


def test_crop_boxes_follow_random_resized_crop_distribution():
    generator = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(20000, 32, 32, (0.8, 1.0), (3 / 4, 4 / 3), generator)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    ours_area = (h * w / 1024)
    torch.manual_seed(0)
    reference = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, 32, 32), [0.8, 1.0], [3 / 4, 4 / 3])
                              for _ in range(20000)], dtype=torch.float)
    ref_area = reference[:, 2] * reference[:, 3] / 1024
    assert abs(ours_area.mean() - ref_area.mean()) < 0.005
    assert abs(ours_area.std() - ref_area.std()) < 0.005
    assert abs(top.mean() - reference[:, 0].mean()) < 0.1
    assert abs((w / h).log().mean() - (reference[:, 3] / reference[:, 2]).log().mean()) < 0.01


def test_crop_falls_back_to_centre_when_nothing_fits():
    # a 4x64 strip cannot hold a 3/4..4/3 box of 80% area: torchvision's fallback is the
    # central crop with the aspect ratio clamped to 4/3
    boxes = sample_crop_boxes(5, 4, 64, (0.8, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0, 29, 4, 5]] * 5
    torch.manual_seed(0)
    assert list(T.RandomResizedCrop.get_params(torch.empty(1, 4, 64), [0.8, 1.0], [3 / 4, 4 / 3])) == [0, 29, 4, 5]


def test_flip_probability_and_effect():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float).view(2, 1, 2, 3)
    assert torch.equal(random_horizontal_flip(x, 1.0), x.flip(-1))
    assert torch.equal(random_horizontal_flip(x, 0.0), x)
    many = torch.arange(4000, dtype=torch.float).view(4000, 1, 1, 1).expand(4000, 1, 1, 2).contiguous()
    many[..., 1] = -1
    flipped = random_horizontal_flip(many, 0.5, torch.Generator().manual_seed(1))
    fraction = (flipped[..., 0] == -1).float().mean().item()
    assert abs(fraction - 0.5) < 0.03


def test_normalization_maps_to_minus_one_one_and_back():
    norm = Normalization()
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = norm(images)
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, 1.0, -0.6]))
    torch.testing.assert_close(norm.undo(out), images.float() / 255)
    assert Normalization.for_channels(1).mean == (0.5,)


def test_batch_augment_is_reproducible_and_keeps_shape():
    augment = BatchAugment(Normalization())
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = augment(images, torch.Generator().manual_seed(5))
    b = augment(images, torch.Generator().manual_seed(5))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    plain = BatchAugment(Normalization(), flip_p=0.0, crop_scale=None)
    torch.testing.assert_close(plain(images), Normalization()(images))
