"""spectrumd's own virtio-fs backend: FUSE over vhost-user, and over /dev/fuse for tests.

Layers: ``protocol`` (the FUSE codec, no I/O), ``tree`` and ``ops`` (the
exported tree and its rules), ``serve`` (one request → one reply), and the
drivers: ``fusedev`` (/dev/fuse), ``virtqueue`` + ``vhost`` (vhost-user),
``control`` and ``__main__`` (the process).
"""
