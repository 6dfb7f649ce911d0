"""The GAN's data (utils/gan_data.py): Poisson and patient-level sampling."""

import numpy as np
import torch

from utils import gan_data


def test_patient_batches_give_k_patches_of_each_sampled_patient():
    patients = np.repeat(np.array(["a", "b", "c"]), [5, 3, 4])
    patches_of = gan_data.patient_patches(patients)
    assert [p.tolist() for p in patches_of] == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11]]
    generator = torch.Generator().manual_seed(0)
    stream = gan_data.patient_batches(gan_data.poisson_sampler(3, 2 / 3, generator), patches_of, 3, generator)
    for _ in range(20):
        batch = next(stream)
        assert len(batch) % 3 == 0
        for i in range(0, len(batch), 3):
            owner = patients[batch[i:i + 3].numpy()]
            assert len(set(owner)) == 1 and len(set(batch[i:i + 3].tolist())) == 3
