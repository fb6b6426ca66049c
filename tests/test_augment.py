
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


def test_the_flip_folded_into_the_crop_grid_equals_flipping_first():
    """BatchAugment mirrors the sampling grid instead of the images; the result is flip, then crop, then resize."""
    images = torch.randint(0, 256, (16, 3, 20, 24), dtype=torch.uint8)
    normalization = Normalization((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    augment = BatchAugment(normalization, crop_scale=(0.3, 1.0), output_size=16)
    out = augment(images, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # the same draws, in the same order: flips, then boxes
    flipped = random_horizontal_flip(images.float() / 255, 0.5, generator)
    boxes = sample_crop_boxes(16, 20, 24, (0.3, 1.0), (3 / 4, 4 / 3), generator)
    reference = normalization(resized_crop(flipped, boxes, (16, 16)))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    assert not torch.allclose(out, normalization(resized_crop(images.float() / 255, boxes, (16, 16))), atol=1e-2)


def test_large_uint8_images_take_the_per_image_path_and_agree_with_the_grid():
    """From LARGE_IMAGE_PIXELS up, crops are resized as uint8 one by one; they sample the grid's points."""
    from vitcraft.augment import LARGE_IMAGE_PIXELS, resized_crop_normalised

    side = int(LARGE_IMAGE_PIXELS ** 0.5) + 4
    smooth = torch.nn.functional.interpolate(torch.rand(6, 3, 12, 12) * 255, size=(side, side), mode="bilinear")
    images = smooth.round().to(torch.uint8)  # smooth, so that rounding to uint8 is the only difference
    normalization = Normalization((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    augment = BatchAugment(normalization, crop_scale=(0.3, 1.0), output_size=64)
    out = augment(images, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    flips = torch.rand(6, generator=generator) < 0.5
    boxes = sample_crop_boxes(6, side, side, (0.3, 1.0), (3 / 4, 4 / 3), generator)
    assert flips.any() and not flips.all()  # both kinds in the batch
    torch.testing.assert_close(out, resized_crop_normalised(images, boxes, (64, 64), flips, normalization))
    grid = normalization.from_pixels(resized_crop(images.float(), boxes, (64, 64), flips))
    inner = (..., slice(1, -1), slice(1, -1))  # the border differs: grid_sample pads, interpolate clamps
    # PyTorch's uint8 resize computes in fixed point and rounds: within a grey level or so (std units: / 255 / std)
    assert (out[inner] - grid[inner]).abs().max() <= 1.5 / 255 / 0.2
