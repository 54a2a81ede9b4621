"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class GuideGenError(Exception):
    """A problem with the user's input (file, option, config) that a person can fix.

    The message must be a single line that names the file or option and the problem, e.g.
    ``"ct/case1.nii.gz: image is 2D (shape (512, 512)); expected a 3D volume"``.
    """
