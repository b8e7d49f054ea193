"""data.py: rotations (sie.md §1.3 test vector), the real on-disk format, the generator, the checker."""
import numpy as np
import torch

import data

A1 = np.array([0.3, -0.7, 1.1], np.float32).astype(np.float64)
A2 = np.array([-1.2, 0.5, 0.2], np.float32).astype(np.float64)


def test_relative_quaternion_test_vector_body_frame():
    # sie.md §1.3: scipy (r1.inv() * r2).as_quat() on these float32 angles, scalar-last
    q = data.relative_quaternion(A1, A2)
    assert np.allclose(q, [-0.538347, 0.646065, -0.168557, 0.514170], atol=1e-6)
    qt = data.relative_quaternion(torch.tensor(A1), torch.tensor(A2))
    assert torch.allclose(qt, torch.tensor(q), atol=1e-12)
    # the world-frame R2 R1^T is a different rotation (same angle, other axis)
    world = data.quaternion_multiply(data.euler_xyz_to_quaternion(A2),
                                     data.euler_xyz_to_quaternion(A1) * [-1, -1, -1, 1])
    assert np.allclose(world, [-0.789959, -0.081562, -0.323947, 0.514170], atol=1e-6)


def test_loader_on_generated_set(toy_root):
    ds = data.Pairs3DIEBench(toy_root, "train")
    x1, x2, g, label = ds[0]
    assert x1.shape == (3, 32, 32) and x1.dtype == torch.float32 and g.shape == (4,)
    assert ds.num_classes == 4 and 0 <= label < 4
    views = data.Views3DIEBench(toy_root, "val")
    assert len(views) == len(views.entries) * 50 and views.latents.shape == (len(views), 7)
