"""frame_to_rgb of frames more than RESIZE_ASPECT_LIMIT times wider than tall, or taller than wide (issue 21, item 5):
docs/design.md section 5.1 crops such a frame to its centre square before resizing. The pixels must be that square's,
in both orientations (a crop taken off centre, or along the wrong axis, may still have the right shape)."""

import av
import numpy as np
import pytest

from cmdcl.data.video import RESIZE_ASPECT_LIMIT, frame_to_rgb

OUTSIDE, FIRST, SECOND = 255, 0, 128  # grey levels: yuv420p keeps them sharp (its colour planes have half the resolution)


def coordinates(height, width):
    """Each pixel says where it is: R = column % 256, G = 25 * (column // 256), B = 12 * (row % 20)."""
    rows, columns = np.mgrid[:height, :width]
    return np.stack([columns % 256, 25 * (columns // 256), 12 * (rows % 20)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("height, width", [(20, 2000), (2000, 20), (20, 81), (81, 20)])
def test_an_extreme_frame_gives_exactly_its_centre_square(height, width):
    """At size = the short side nothing is resized, so the output is the centre square itself, pixel for pixel:
    rows (or columns) from (long - 20) // 2 on."""
    assert max(height, width) > RESIZE_ASPECT_LIMIT * min(height, width)
    image = coordinates(height, width)
    top, left = (height - 20) // 2, (width - 20) // 2  # 0 and 990 for 20 x 2000
    rgb = frame_to_rgb(av.VideoFrame.from_ndarray(image, format="rgb24"), 20)
    assert np.array_equal(rgb, image[top : top + 20, left : left + 20])


def two_toned_centre(height, width):
    """White everywhere but the centre square, whose first half (along the long side) is black and second half grey."""
    image = np.full((height, width, 3), OUTSIDE, np.uint8)
    short = min(height, width)
    if width > height:
        left = (width - short) // 2
        image[:, left : left + short // 2], image[:, left + short // 2 : left + short] = FIRST, SECOND
    else:
        top = (height - short) // 2
        image[top : top + short // 2], image[top + short // 2 : top + short] = FIRST, SECOND
    return image


@pytest.mark.parametrize("pixel_format", ["rgb24", "yuv420p"])
@pytest.mark.parametrize("height, width", [(20, 2000), (2000, 20)])
def test_an_extreme_frame_resized_shows_its_centre_square_only(height, width, pixel_format):
    """Resized to 32 x 32 (and from yuv420p, as decoded frames are): black then grey along the long side, no white."""
    frame = av.VideoFrame.from_ndarray(two_toned_centre(height, width), format="rgb24").reformat(format=pixel_format)
    rgb = frame_to_rgb(frame, 32).astype(int)
    if width < height:
        rgb = rgb.transpose(1, 0, 2)  # the long side along the columns
    assert np.abs(rgb[:, :12] - FIRST).max() <= 4 and np.abs(rgb[:, -12:] - SECOND).max() <= 4
    assert rgb.max() <= SECOND + 4  # nothing from outside the square


@pytest.mark.parametrize("height, width", [(48, 64), (64, 48), (40, 160), (160, 40)])
def test_an_ordinary_frame_gives_its_centre_after_resizing_the_short_side(height, width):
    """Within the aspect limit: at size = the short side nothing is resized, so the output is the centre square,
    pixel for pixel (a crop from a corner keeps the shape and, on frames that vary along one axis only, the look)."""
    image = coordinates(height, width)
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    rgb = frame_to_rgb(av.VideoFrame.from_ndarray(image, format="rgb24"), short)
    assert np.array_equal(rgb, image[top : top + short, left : left + short])
