"""Perturbations: shapes and range, seeding, containers, hand-checkable properties
(docs/method.md §4, §5)."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
from torch import nn

from cppo_lightning.perturbations import (
    Chain,
    OneOf,
    PatchMask,
    RandomOcclusion,
    ZoomCrop,
    apply_seeded,
    information_preserving,
    information_removing,
    patch_masking,
    view_seed,
)

H, W = 64, 80  # non-square on purpose


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, H, W, generator=generator)


def _members(family: OneOf) -> dict[str, nn.Module]:
    return {type(m).__name__: m for m in family.members}


# name -> (factory, random?) ; each factory builds a fresh module.
PERTURBATIONS = {
    "RandomOcclusion": RandomOcclusion,
    "ZoomCrop": ZoomCrop,
    "PatchMask": PatchMask,
    "ColorJitter": lambda: _members(information_preserving())["ColorJitter"],
    "RandomPerspective": lambda: _members(information_preserving())["RandomPerspective"],
    "RandomRotation": lambda: _members(information_preserving())["RandomRotation"],
    "information_preserving": information_preserving,
    "information_removing": information_removing,
    "patch_masking": patch_masking,
    "Chain": lambda: Chain([ZoomCrop(), K.RandomRotation(10.0, p=1.0), PatchMask()]),
}


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_keeps_shape_and_unit_range(name, images):
    module = PERTURBATIONS[name]()
    torch.manual_seed(1)
    direct = module(images)
    assert direct.shape == images.shape
    # kornia's bilinear warps can leave float noise just outside [0, 1]; apply_seeded clamps.
    assert direct.min() >= -1e-5 and direct.max() <= 1 + 1e-5
    for seed in range(3):
        out = apply_seeded(module, images, seed)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1
    single = apply_seeded(module, images[0], 5)
    assert single.shape == images[0].shape


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_apply_seeded_is_reproducible_and_isolated(name, images):
    module = PERTURBATIONS[name]()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = apply_seeded(module, images, 7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, apply_seeded(module, images, 7))
    assert torch.equal(first, apply_seeded(PERTURBATIONS[name](), images, 7))  # a fresh module too
    others = [apply_seeded(module, images, seed) for seed in (8, 9, 10)]
    assert any(not torch.equal(first, other) for other in others)
    assert torch.equal(torch.get_rng_state(), state)


def test_view_seed_is_deterministic_and_well_spread():
    seed = view_seed(0, 3, 1, "removing")
    assert seed == view_seed(0, 3, 1, "removing")
    assert 0 <= seed < 2**63
    variants = {
        view_seed(0, 3, 1, "removing"),
        view_seed(1, 3, 1, "removing"),
        view_seed(0, 4, 1, "removing"),
        view_seed(0, 3, 2, "removing"),
        view_seed(0, 3, 1, "preserving"),
    }
    assert len(variants) == 5
    seeds = [view_seed(0, i, 0, "removing") for i in range(512)]
    assert len(set(seeds)) == 512
    top_bits = [s >> 62 for s in seeds]  # well mixed: the top bit is about half ones
    assert 0.35 < sum(top_bits) / len(top_bits) < 0.65
    with pytest.raises(ValueError, match="index"):
        view_seed(0, 1.5, 0, "removing")  # type: ignore[arg-type]


def test_one_of_draws_every_member(images):
    family = information_preserving()
    used = set()
    for seed in range(40):
        apply_seeded(family, images, view_seed(0, seed, 0, "preserving"))
        used.add(family.last_index)
    assert used == {0, 1, 2}
    removing = information_removing()
    used = set()
    for seed in range(20):
        apply_seeded(removing, images, seed)
        used.add(removing.last_index)
    assert used == {0, 1}


def test_one_of_weights(images):
    one_of = OneOf([RandomOcclusion(), ZoomCrop()], weights=[0.0, 1.0])
    for seed in range(10):
        apply_seeded(one_of, images, seed)
        assert one_of.last_index == 1
    with pytest.raises(ValueError, match="weights"):
        OneOf([ZoomCrop()], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        OneOf([ZoomCrop(), PatchMask()], weights=[-1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        OneOf([])
    with pytest.raises(ValueError, match="list"):
        Chain(ZoomCrop())  # type: ignore[arg-type]


class _Shrink(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[..., : images.shape[-2] // 2, :]


@pytest.mark.parametrize("bad", [lambda: K.Resize((32, 32)), _Shrink], ids=["Resize", "Shrink"])
def test_size_changing_member_is_named(bad, images):
    name = type(bad()).__name__
    for container in (OneOf([bad()]), Chain([ZoomCrop(), bad()])):
        with pytest.raises(ValueError, match=rf"{name}.*changed the image size from 64x80"):
            container(images)
    with pytest.raises(ValueError, match=rf"{name}.*changed the image size"):
        apply_seeded(bad(), images, 0)


class _AddChannel(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images, images[:, :1]], dim=1)


def test_shape_change_of_channels_is_reported(images):
    with pytest.raises(ValueError, match=r"_AddChannel.*\[2, 3, 64, 80\] to \[2, 4, 64, 80\]"):
        apply_seeded(_AddChannel(), images, 0)
    with pytest.raises(ValueError, match="_AddChannel"):
        Chain([K.RandomRotation(5.0, p=1.0), _AddChannel()])(images)


def test_apply_seeded_rejects_bad_input(images):
    with pytest.raises(ValueError, match="float"):
        apply_seeded(ZoomCrop(), (images * 255).to(torch.uint8), 0)
    with pytest.raises(ValueError, match="RGB"):
        apply_seeded(ZoomCrop(), images[:, :1], 0)
    with pytest.raises(ValueError, match="seed"):
        apply_seeded(ZoomCrop(), images, -1)


def test_patch_mask_extremes_and_grid(images):
    assert torch.equal(PatchMask(mask_prob=1.0)(images), torch.zeros_like(images))
    assert torch.equal(PatchMask(mask_prob=0.0)(images), images)
    masker = PatchMask(patch_size=14, mask_prob=0.5)
    out = masker(images)
    assert masker._params["patch_mask"].shape == (
        2,
        5,
        6,
    )  # ceil(64/14), ceil(80/14): partial patches
    # Every 14x14 patch (and the partial ones at the edges) is either all black or untouched.
    for i in range(5):
        for j in range(6):
            patch = out[:, :, 14 * i : 14 * (i + 1), 14 * j : 14 * (j + 1)]
            source = images[:, :, 14 * i : 14 * (i + 1), 14 * j : 14 * (j + 1)]
            masked = masker._params["patch_mask"][:, i, j]
            for b in range(2):
                expected = torch.zeros_like(source[b]) if masked[b] else source[b]
                assert torch.equal(patch[b], expected)


def test_patch_mask_rate_is_mask_prob():
    masker = PatchMask(patch_size=2, mask_prob=0.6)
    masker(torch.rand(4, 3, 64, 64))
    rate = masker._params["patch_mask"].float().mean().item()
    assert 0.55 < rate < 0.65


def test_occlusion_full_rectangle_and_identity(images):
    full = RandomOcclusion(num_rectangles=1, scale=(1.0, 1.0))(images)
    assert (full != images).float().mean() > 0.999
    assert full.min() >= 0 and full.max() <= 1
    assert abs(full.mean().item() - 0.5) < 0.02  # uniform noise
    assert torch.equal(RandomOcclusion(num_rectangles=0)(images), images)


def test_occlusion_rectangles_follow_the_spec():
    occlusion = RandomOcclusion()
    occlusion(torch.rand(8, 3, 100, 200))
    params = occlusion._params
    heights, widths = params["heights"], params["widths"]
    assert heights.shape == (8, 50)
    assert heights.min() >= 5 and heights.max() <= 15
    assert widths.min() >= 10 and widths.max() <= 30
    assert (params["ys"] >= 0).all() and (params["ys"] + heights <= 100).all()
    assert (params["xs"] >= 0).all() and (params["xs"] + widths <= 200).all()
    # Height and width fractions are drawn independently.
    assert not torch.equal(heights / 100, widths / 200)


def test_occlusion_covers_only_its_rectangles(images):
    occlusion = RandomOcclusion(num_rectangles=3)
    out = occlusion(images)
    params = occlusion._params
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    for b in range(2):
        for r in range(3):
            y, x = params["ys"][b, r], params["xs"][b, r]
            mask[b, y : y + params["heights"][b, r], x : x + params["widths"][b, r]] = True
    outside = ~mask[:, None].expand_as(images)
    assert torch.equal(out[outside], images[outside])
    assert (out[~outside] != images[~outside]).float().mean() > 0.99


def test_zoom_crop_constant_and_ramp():
    constant = torch.full((2, 3, H, W), 0.37)
    assert torch.allclose(ZoomCrop()(constant), constant, atol=1e-6)
    ramp = torch.linspace(0, 1, W).expand(2, 3, H, W).contiguous()
    zoom = ZoomCrop()
    out = zoom(ramp)
    scale = zoom._params["scale"]
    assert ((scale >= 0.6) & (scale <= 0.7)).all()
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert (span < 0.72).all() and (span > 0.55).all()
    # Rows of a horizontal ramp stay identical and increasing.
    assert torch.allclose(out[:, :, :1], out, atol=1e-5)
    assert (out[..., 1:] >= out[..., :-1] - 1e-6).all()


def test_zoom_crop_matches_interpolate_on_integer_crop(images):
    zoom = ZoomCrop(scale=(0.5, 0.5))
    zoom(images)
    params = dict(zoom._params)
    params["x0"] = torch.tensor([8.0, 0.0])
    params["y0"] = torch.tensor([4.0, 32.0])
    out = zoom(images, params=params)
    reference = nn.functional.interpolate(
        images[:1, :, 4:36, 8:48], size=(H, W), mode="bilinear", align_corners=False
    )
    # Inside the crop the half-pixel resampling equals F.interpolate's; at the crop's edge ZoomCrop
    # reads the neighbouring pixels outside the window instead of clamping to it.
    assert torch.allclose(out[:1, :, 1:-1, 1:-1], reference[:, :, 1:-1, 1:-1], atol=1e-5)


@pytest.mark.parametrize(
    "factory",
    [
        RandomOcclusion,
        ZoomCrop,
        PatchMask,
        lambda: RandomOcclusion(p=0.5),
        lambda: ZoomCrop(p=0.5),
        lambda: PatchMask(p=0.5),
    ],
)
def test_kornia_params_replay(factory, images):
    module = factory()
    torch.manual_seed(3)
    first = module(images)
    torch.manual_seed(99)  # a different global state must not matter on replay
    assert torch.equal(module(images, params=module._params), first)


def test_p_gates_each_image(images):
    module = PatchMask(mask_prob=1.0, p=0.5)
    torch.manual_seed(0)
    outputs = [module(images) for _ in range(20)]
    zeroed = {bool((o[b] == 0).all()) for o in outputs for b in range(2)}
    kept = {bool(torch.equal(o[b], images[b])) for o in outputs for b in range(2)}
    assert zeroed == {True, False} and kept == {True, False}


def test_keepdim_and_unbatched_input(images):
    for module in (RandomOcclusion(keepdim=True), ZoomCrop(keepdim=True), patch_masking()):
        assert module(images[0]).shape == images[0].shape
    assert ZoomCrop()(images[0]).shape == (1, 3, H, W)  # kornia's default keepdim=False
    assert information_preserving()(images[0]).shape == images[0].shape


def test_color_jitter_brightness_is_a_multiplicative_factor():
    jitter = _members(information_preserving())["ColorJitter"]
    image = torch.full((1, 3, 8, 8), 0.8)
    jitter(image)
    params = dict(jitter._params)
    params.update(
        brightness_factor=torch.tensor([0.5]),
        contrast_factor=torch.tensor([1.0]),
        saturation_factor=torch.tensor([1.0]),
        hue_factor=torch.tensor([0.0]),
    )
    assert torch.allclose(jitter(image, params=params), torch.full_like(image, 0.4))


def test_rotation_keeps_canvas_with_black_fill():
    rotation = _members(information_preserving())["RandomRotation"]
    image = torch.ones(1, 3, H, W)
    rotation(image)
    params = dict(rotation._params)
    params["degrees"] = torch.tensor([10.0])
    out = rotation(image, params=params)
    assert out.shape == image.shape
    assert (out[..., 0, 0] < 0.05).all() and (out[..., H // 2, W // 2] > 0.99).all()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: RandomOcclusion(num_rectangles=-1), "num_rectangles"),
        (lambda: RandomOcclusion(num_rectangles=2.5), "num_rectangles"),
        (lambda: RandomOcclusion(scale=(0.2, 0.1)), "scale"),
        (lambda: RandomOcclusion(scale=(0.0, 0.1)), "scale"),
        (lambda: RandomOcclusion(scale=(0.1,)), "scale"),
        (lambda: RandomOcclusion(p=1.5), "p must"),
        (lambda: ZoomCrop(scale=(0.6, 1.2)), "scale"),
        (lambda: ZoomCrop(scale=0.6), "scale"),
        (lambda: PatchMask(patch_size=0), "patch_size"),
        (lambda: PatchMask(mask_prob=-0.1), "mask_prob"),
        (lambda: PatchMask(p=-1), "p must"),
        (lambda: OneOf([ZoomCrop(), "not a module"]), "member 1"),
    ],
)
def test_invalid_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("factory", [RandomOcclusion, ZoomCrop, PatchMask])
def test_same_on_batch_shares_the_draw(factory):
    image = torch.rand(1, 3, H, W).expand(3, 3, H, W).contiguous()
    out = factory(same_on_batch=True)(image)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_containers_build_from_yaml_config(images):
    jsonargparse = pytest.importorskip("jsonargparse")
    config = {
        "view": {
            "class_path": "cppo_lightning.perturbations.OneOf",
            "init_args": {
                "weights": [1.0, 2.0],
                "members": [
                    {
                        "class_path": "cppo_lightning.perturbations.RandomOcclusion",
                        "init_args": {"num_rectangles": 10, "scale": [0.1, 0.2]},
                    },
                    {
                        "class_path": "cppo_lightning.perturbations.Chain",
                        "init_args": {
                            "members": [
                                {"class_path": "cppo_lightning.perturbations.ZoomCrop"},
                                {
                                    "class_path": "kornia.augmentation.ColorJitter",
                                    "init_args": {"brightness": [0.2, 1.3], "p": 1.0},
                                },
                            ]
                        },
                    },
                ],
            },
        }
    }
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--view", type=nn.Module)
    namespace = parser.parse_object(config)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    view = instantiate(namespace).view
    assert isinstance(view, OneOf) and view.weights == [1.0, 2.0]
    assert isinstance(view.members[0], RandomOcclusion) and view.members[0].scale == (0.1, 0.2)
    assert isinstance(view.members[1], Chain) and len(view.members[1].members) == 2
    assert apply_seeded(view, images, 0).shape == images.shape
