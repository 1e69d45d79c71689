"""Weight-sync channels that carry published policy versions from the trainer to the engines.

`CHANNELS` maps a name (`sync.channel`) to a `WeightChannel` class; importing this package
registers the built-in ones: inprocess, shm, torch_dist, ray (Ray itself is imported only when a
Ray channel is built). `SyncReceiver` runs a channel's `receive` in the background for an engine.
"""

from dora.sync.base import (
    CHANNELS, ChecksumError, PublishReceipt, ReadMode, SyncConfig, SyncRole, SyncTimeout, WeightChannel,
    build_channel,
)
from dora.sync.inprocess import InProcessChannel
from dora.sync.ray_store import RayChannel
from dora.sync.receiver import SyncReceiver
from dora.sync.shm import ShmChannel, cleanup_stale
from dora.sync.torch_dist import TorchDistChannel

__all__ = [
    "CHANNELS", "ChecksumError", "InProcessChannel", "PublishReceipt", "RayChannel", "ReadMode", "ShmChannel",
    "SyncConfig", "SyncReceiver", "SyncRole", "SyncTimeout", "TorchDistChannel", "WeightChannel", "build_channel",
    "cleanup_stale",
]
