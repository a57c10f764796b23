"""Runs trainings back to back in one process as ``hvd_distef.experiments.sweep`` does, recording what
each run starts from: a digest of the model's initial weights (rank 0's, before the broadcast) and of
every training batch this rank draws. Writes {run name: {"init", "batches"}} from rank 0 to argv[1];
the runs are the flag lists in the JSON file argv[2]. tests/test_experiments.py judges the pairing."""
import hashlib
import json
import sys

import horovod.torch as hvd

from hvd_distef.experiments import sweep
from hvd_distef.train import data as data_mod
from hvd_distef.train import loop


def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


current = {}
build, train_batches = loop.build, data_mod.Dataset.train_batches


def recording_build(*args, **kwargs):
    model = build(*args, **kwargs)
    current["init"] = digest(*model.state_dict().values())
    return model


def recording_batches(self, *args, **kwargs):
    for x, y in train_batches(self, *args, **kwargs):
        current.setdefault("batches", []).append(digest(x, y))
        yield x, y


loop.build = recording_build
data_mod.Dataset.train_batches = recording_batches
hvd.init()
seen = {}
for flags in json.loads(open(sys.argv[2]).read()):
    current.clear()
    outcome = sweep.run_one(flags, hvd.rank())
    assert "error" not in outcome, outcome
    seen[flags[flags.index("--log-dir") + 1]] = dict(current)
everyone = hvd.allgather_object(seen)
if hvd.rank() == 0:
    json.dump({"ranks": everyone}, open(sys.argv[1], "w"))
