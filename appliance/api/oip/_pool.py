"""The descriptor pool of the vendored messages (see build/gen_oip_stubs.py): private, so that
another copy of Triton's protos in the same process (tritonclient's) does not clash with it."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
