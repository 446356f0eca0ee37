#!/bin/sh
# STAND-IN for CloudLab's mkextrafs.pl, for the Molecule scenario only. The real script exists
# only on CloudLab nodes, where it makes a file system on the node's spare disk space and mounts
# it at the mount point it is given (its last argument). This one mounts a tmpfs there instead
# (the test containers have CAP_SYS_ADMIN) and appends its arguments to a log first, so that
# verify.yml can count the calls. It refuses a mount point that is already mounted: a second call
# fails the run instead of hiding the first file system under a new one.
set -eu
log=/var/log/mkextrafs-standin.log
for mount_point in "$@"; do :; done
echo "$*" >>"$log"
if findmnt --mountpoint "$mount_point" >/dev/null; then
    echo "mkextrafs stand-in: $mount_point is already mounted" >&2
    exit 1
fi
mkdir -p "$mount_point"
# mode 0755 as on a fresh ext4 file system: only root may write at the top.
mount -t tmpfs -o size=1g,mode=0755 mkextrafs "$mount_point"
