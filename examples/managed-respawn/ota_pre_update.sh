#!/bin/sh
# ggc-ota runs this before it updates itself. ggc-ota manages its own process (the new agent
# runs on trial beside the old one, then takes over), so there is nothing to stop: this is
# the place for a site's own step (a notice, a backup of <root>/ota). Exit 75 postpones the
# update; any other non-zero exit fails it, with nothing changed.
# Install as <root>/usr/scripts/ota_pre_update.sh, owned by root, mode 0700.
set -eu
exit 0
