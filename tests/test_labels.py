"""unet.data.labels: raw labels of each kind -> targets, the ignore value, and the refusals (known answers)."""
import numpy as np
import pytest

from unet.data.labels import IGNORE, LabelOptions, check_some_labelled, instance_membrane_target, label_target
from unet.errors import UserError
from unet.metrics.cells import label_cells


@pytest.mark.parametrize("cell", [1, 255])
def test_binary_labels_are_0_membrane_1_cell(cell):
    raw = np.array([[0, cell], [cell, 0]], np.uint8)
    assert label_target(raw, "l.tif").tolist() == [[0, 1], [1, 0]]


def test_binary_with_an_ignore_value():
    raw = np.array([[0, 1, 7], [7, 1, 0]], np.uint8)
    t = label_target(raw, "l.tif", LabelOptions(ignore_label=7))
    assert t.tolist() == [[0, 1, IGNORE], [IGNORE, 1, 0]]


def test_classes_keep_their_values_and_ignore_becomes_IGNORE():
    raw = np.array([[0, 1, 2], [2, 9, 0]], np.uint16)
    t = label_target(raw, "l.tif", LabelOptions(label_kind="classes", num_classes=3, ignore_label=9))
    assert t.dtype == np.uint8 and t.tolist() == [[0, 1, 2], [2, IGNORE, 0]]


def test_instances_become_a_membrane_map_that_parts_touching_objects():
    # Objects 1 and 2 touch along a vertical line; 0 is background. Every object pixel with a 4-neighbour in
    # another object is boundary (0); the rest of each object is 1, next to the background too.
    raw = np.array([[1, 1, 1, 2, 2, 2],
                    [1, 1, 1, 2, 2, 2],
                    [1, 1, 1, 2, 2, 2],
                    [0, 0, 0, 0, 0, 0]], np.int32)
    expected = [[1, 1, 0, 0, 1, 1],
                [1, 1, 0, 0, 1, 1],
                [1, 1, 0, 0, 1, 1],
                [0, 0, 0, 0, 0, 0]]
    assert instance_membrane_target(raw).tolist() == expected
    assert label_target(raw, "l.tif", LabelOptions(label_kind="instances")).tolist() == expected


def test_instances_with_an_ignore_value():
    raw = np.array([[5, 5, 3], [5, 5, 3]], np.int32)
    t = label_target(raw, "l.tif", LabelOptions(label_kind="instances", ignore_label=3))
    # 3 is ignored (not an object): object 5 touches only ignored pixels, which count as background here.
    assert t.tolist() == [[1, 1, IGNORE], [1, 1, IGNORE]]


def test_diagonal_contact_is_no_boundary_and_connected_components_give_back_the_binary_labels():
    # Cells kept apart by membrane pixels, as in ISBI 2012: their 4-connected components as instance labels
    # must train on exactly the binary labels (objects 1 and 2 meet only at a corner, which is no 4-contact).
    binary = np.array([[1, 1, 0, 0],
                       [1, 1, 0, 0],
                       [0, 0, 1, 1],
                       [0, 1, 1, 0]], np.uint8)
    instances = label_cells(binary > 0)
    assert instances.max() == 2
    assert instance_membrane_target(instances).tolist() == binary.tolist()


@pytest.mark.parametrize("raw, options, message", [
    (np.array([[0, 3], [255, 0]], np.uint8), LabelOptions(), "l.tif: label values include {3}"),
    (np.array([[0, 3], [4, 0]], np.uint8), LabelOptions(label_kind="classes", num_classes=3),
     "l.tif: label values {3, 4} are outside 0..2; raise --num-classes"),
    (np.array([[0, 3], [4, 9]], np.uint8), LabelOptions(label_kind="classes", num_classes=3, ignore_label=9),
     "l.tif: label values {3, 4} are outside 0..2 and not the ignore value 9"),
    (np.zeros((2, 2, 3), np.uint8), LabelOptions(), "l.tif: labels have 2 channels"),
    (np.zeros((2, 2), np.float32), LabelOptions(), "l.tif: labels are float32 but must be integers"),
])
def test_bad_labels_name_the_values_and_the_file(raw, options, message):
    with pytest.raises(UserError) as e:
        label_target(raw, "l.tif", options)
    assert str(e.value).startswith(message)


def test_all_ignored_is_refused_and_one_labelled_pixel_is_enough():
    ignored = np.full((3, 3), IGNORE, np.uint8)
    with pytest.raises(UserError, match="labels/: every label pixel has the ignore value"):
        check_some_labelled([ignored, ignored], "labels/")
    one = ignored.copy()
    one[1, 1] = 0
    check_some_labelled([ignored, one], "labels/")


@pytest.mark.parametrize("kwargs, message", [
    ({"label_kind": "blobs"}, "--label-kind must be one of binary, classes, instances"),
    ({"label_kind": "classes", "num_classes": 1}, "--num-classes must be from 2 to 255, got 1"),
    ({"label_kind": "binary", "num_classes": 3}, "--num-classes 3 needs --label-kind classes"),
    ({"label_kind": "classes"}, "--label-kind classes needs --num-classes K"),
])
def test_inconsistent_options_are_refused(kwargs, message):
    with pytest.raises(UserError) as e:
        LabelOptions(**kwargs)
    assert str(e.value).startswith(message)
