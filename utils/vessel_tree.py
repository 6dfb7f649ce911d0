"""The phantoms' cerebral artery tree: grown in millimetres, then rasterised onto the voxel grid with partial volume.

The tree (grow_vessel_tree) is a list of tapered, tortuous polylines: trunks enter the slab from below, meet in a
circle-of-Willis-like junction and branch outward (Murray's law) down to MIN_RADIUS. rasterise_vessels turns it
into each voxel's vessel occupancy (the fraction of the voxel a vessel fills, through a Gaussian stand-in for the
voxel's box) and blood signal. utils/phantoms.py images it, with the brain around it, like TOF-MRA.
"""

from collections import namedtuple
from functools import lru_cache

import numpy as np
from scipy import special
from scipy.signal import lfilter

# Vessel tree, in mm. Radii follow the anatomy: ICA ~1.9, basilar ~1.5, M1 ~1.35, A1/P1 ~1. A branch ends in a
# bifurcation (Murray's law, r^3 = r1^3 + r2^3) and gives off thinner side branches on its way.
MIN_RADIUS = 0.2  # thinner branches are not grown (too faint to matter, and the bulk of the work)
BRANCH_LENGTH = (40.0, 80.0)  # length of a branch between bifurcations, in its starting radii
SIDE_GAP = 6.0  # mean distance between side branches, in parent radii
SIDE_RATIO = (0.3, 0.7)  # side branch radius / parent radius
SIDE_ANGLE = (45.0, 90.0)  # degrees between parent and side branch
FORK_ASYMMETRY = (0.4, 0.9)  # radius of the thinner / the thicker child of a bifurcation
FORK_ANGLE = (15.0, 45.0)  # degrees between parent and each child of a bifurcation
SIDE_LOSS = 0.2  # fraction of the Murray radius loss a parent suffers at a side branch
TAPER = 0.95  # radius at the end of a branch / at its start, besides the losses to side branches
WIGGLE = 0.5  # amplitude of the tortuosity (direction deviation)
WIGGLE_MM = 4.0  # correlation length of the tortuosity
LARGE_RADIUS = 0.35  # mm; branches this thick are grown only while the budget of large vessels lasts
LARGE_FRACTION = (0.005, 0.009)  # that budget, as a fraction of the brain's volume (drawn per patient)
MAX_BRANCHES = 30000  # guard against a runaway tree
MAX_SPROUTS = 500  # new side branches added to a tree that died out before reaching its budget


def voxel_axes_mm(shape, spacing):
    """Voxel-centre coordinates in mm along x, y, z, shaped to broadcast against a volume."""
    axes = []
    for axis, (n, step) in enumerate(zip(shape, spacing)):
        coords = ((np.arange(n) - (n - 1) / 2) * step).astype(np.float32)
        axes.append(coords.reshape([-1 if a == axis else 1 for a in range(3)]))
    return axes


# ---------------------------------------------------------------- vessel tree
Branch = namedtuple("Branch", "points radii brightness")  # (n,3) mm, (n,) mm, (n,) blood signal / protocol.blood


def grow_vessel_tree(rng, head, extent_mm, protocol, large_budget):
    """Grow the artery tree: circle-of-Willis-like trunks, then bifurcations and side branches to MIN_RADIUS.

    The named arteries are always there; the other branches are grown in random order, those at least
    LARGE_RADIUS thick only while such vessels (besides the named ones) hold less than large_budget mm^3 of
    the slab; a tree that dies out before (its branches left the slab) sprouts new side branches. This sets
    the vessel density whatever the size of the volume. Branches end where they leave the slab; at the
    brain's surface they turn and run along it, as cortical arteries do. Returns a list of Branch polylines.
    """
    z_low = -extent_mm[2] / 2
    # the tip of the basilar artery lies near the middle of an axial image, the rest of the circle in front of it
    tip = np.array([*(head.centre[:2] + rng.normal(0, 1.5, size=2)), z_low + 0.3 * extent_mm[2]])
    entry_z = z_low - 5.0  # the trunks enter from below the slab
    grower = _TreeGrower(rng, head, (z_low, -z_low), entry_z - 1, protocol)
    uniform = rng.uniform
    for side in (-1, 1):
        start = tip + [side * uniform(10, 13), uniform(10, 14), entry_z - tip[2]]
        ica = grower.grow(start, (-0.15 * side, -0.1, 1), uniform(1.8, 2.0), tip[2] - entry_z, fork=False)
        if ica is not None:
            top = ica.points[-1]
            grower.grow(top, (side, uniform(-0.1, 0.3), uniform(0.05, 0.3)), uniform(1.25, 1.45), uniform(15, 22))  # M1
            grower.grow(top, (-0.35 * side, 1, uniform(0.1, 0.4)), uniform(0.95, 1.1), uniform(14, 20))  # A1
            grower.grow(top, (0, -1, uniform(-0.1, 0.1)), uniform(0.45, 0.6), 12.0, fork=False)  # PComm
    start = tip + [0, -uniform(1, 3), entry_z - tip[2]]
    basilar = grower.grow(start, (0, 0.15, 1), uniform(1.4, 1.6), tip[2] - entry_z, fork=False)
    if basilar is not None:
        for side in (-1, 1):
            grower.grow(basilar.points[-1], (0.7 * side, -0.7, uniform(0.1, 0.3)), uniform(0.95, 1.1),
                        uniform(8, 12))  # P1
    named_volume = grower.large_volume
    sprouts = 0
    while len(grower.branches) < MAX_BRANCHES:
        budget_left = grower.large_volume - named_volume < large_budget
        if not grower.queue:  # the tree died out early (its branches left the slab): sprout a new side branch
            if not budget_left or sprouts == MAX_SPROUTS or not grower.sprout():
                break
            sprouts += 1
            continue
        branch = grower.queue.pop(rng.integers(len(grower.queue)))
        if branch[2] < LARGE_RADIUS or budget_left:
            grower.grow(*branch)
    return grower.branches


class _TreeGrower:
    """Grows branches one at a time; each queues its side branches and the two children of its end fork."""

    def __init__(self, rng, head, slab, entry_z, protocol):
        self.rng, self.head, self.protocol = rng, head, protocol
        self.slab = slab  # z range of the volume, mm
        self.z_range = (entry_z, slab[1] + 1.0)  # where branches may run: trunks enter from below
        self.queue = []  # grow() arguments: (start, direction, radius, length, travelled mm, fork)
        self.branches = []
        self.trunks = []  # branches starting at least twice LARGE_RADIUS thick, to sprout from
        self.large_volume = 0.0  # mm^3 of vessels at least LARGE_RADIUS thick inside the slab

    def add(self, start, direction, radius, length=None, travelled=0.0, fork=True):
        """Queue a branch (length None: drawn from BRANCH_LENGTH); too thin ones are dropped."""
        if radius >= MIN_RADIUS:
            length = radius * self.rng.uniform(*BRANCH_LENGTH) if length is None else length
            self.queue.append((start, direction, radius, length, travelled, fork))

    def sprout(self):
        """Queue a new side branch of a random large vessel at a random place; False if there is none."""
        if not self.trunks:
            return False
        rng = self.rng
        parent = self.trunks[rng.integers(len(self.trunks))]
        index = rng.integers(1, len(parent.points))
        heading = parent.points[index] - parent.points[index - 1]
        heading = heading[None] / np.linalg.norm(heading)
        direction = _turn(heading, np.radians(rng.uniform(*SIDE_ANGLE)), _perpendicular(rng, heading))[0]
        self.add(parent.points[index], direction, parent.radii[index] * rng.uniform(0.5, 0.8))
        return True

    def grow(self, start, direction, radius, length, travelled=0.0, fork=True):
        """Walk one tortuous branch and queue its children; None if it left the brain or slab at once."""
        rng = self.rng
        step = float(np.clip(1.5 * radius, 0.4, 1.2))
        n = max(2, int(np.ceil(length / step)))
        direction = np.asarray(direction, float) / np.linalg.norm(direction)
        # Tortuosity: heading = main direction + a smooth (AR(1)) random deviation with ~WIGGLE_MM memory.
        keep = np.exp(-step / WIGGLE_MM)
        kicks = rng.normal(0, WIGGLE * np.sqrt(1 - keep**2), size=(n, 3))
        deviation = lfilter([1.0], [1.0, -keep], kicks, axis=0)
        headings = direction + deviation - deviation[0]
        headings /= np.linalg.norm(headings, axis=1, keepdims=True)
        points = np.vstack([start, start + np.cumsum(headings * step, axis=0)])
        in_brain = self.head.level(points[:, 0], points[:, 1], points[:, 2]) <= 1
        in_slab = (points[:, 2] >= self.z_range[0]) & (points[:, 2] <= self.z_range[1])
        outside = np.flatnonzero(~(in_brain & in_slab)[1:])
        n_kept = 1 + (outside[0] if outside.size else n)  # the points before the first one outside
        if n_kept < 2:
            return None
        points = points[:n_kept]
        arc = np.arange(n_kept) * step

        # Side branches at random places; the parent loses radius at each (Murray).
        at = np.sort(rng.integers(1, n_kept, size=rng.poisson(arc[-1] / (SIDE_GAP * radius))))
        ratios = rng.uniform(*SIDE_RATIO, size=at.size)
        loss = np.ones(n_kept)
        np.multiply.at(loss, at, (1 - SIDE_LOSS * ratios**3) ** (1 / 3))
        radii = radius * (1 - (1 - TAPER) * arc / length) * np.cumprod(loss)
        brightness = flow_signal(radii, travelled + arc, self.protocol) * rng.uniform(0.9, 1.1)
        branch = Branch(points, radii, brightness)
        self.branches.append(branch)
        if radius >= 2 * LARGE_RADIUS:
            self.trunks.append(branch)
        counted = (radii[:-1] >= LARGE_RADIUS) & (points[:-1, 2] >= self.slab[0]) & (points[:-1, 2] <= self.slab[1])
        self.large_volume += float(np.sum(np.pi * radii[:-1][counted] ** 2) * step)

        arriving = headings[at - 1]  # headings of the segments arriving at the side branches' points
        angles = np.radians(rng.uniform(*SIDE_ANGLE, size=(at.size, 1)))
        directions = _turn(arriving, angles, _perpendicular(rng, arriving))
        for index, side_direction, side_radius in zip(at, directions, ratios * radii[at - 1]):
            self.add(points[index], side_direction, side_radius, travelled=travelled + arc[index])
        end, heading, travelled = points[-1], headings[n_kept - 2], travelled + arc[-1]
        if not outside.size:
            if fork:  # reached its full length: fork into two
                thinner = rng.uniform(*FORK_ASYMMETRY)
                thick = radii[-1] / (1 + thinner**3) ** (1 / 3)
                plane = _perpendicular(rng, heading[None])[0]
                for child_radius, sign in ((thick, 1), (thinner * thick, -1)):
                    angle = np.radians(rng.uniform(*FORK_ANGLE))
                    self.add(end, _turn(heading, angle, sign * plane), child_radius, travelled=travelled)
        elif in_slab[n_kept]:  # hit the brain's surface: go on along it, slightly inwards
            normal = self.head.normal(end)
            along = heading - max(heading.dot(normal), 0) * normal - 0.3 * normal
            self.add(end, along, radii[-1], length - arc[-1], travelled, fork)
        return branch


def _perpendicular(rng, directions):
    """Random unit vectors perpendicular to the unit vectors in the rows of directions."""
    other = rng.normal(size=directions.shape)
    other -= (other * directions).sum(axis=1, keepdims=True) * directions
    return other / np.linalg.norm(other, axis=1, keepdims=True)


def _turn(direction, angle, towards):
    """direction rotated by angle (radians) towards the perpendicular unit vector `towards` (rows broadcast)."""
    return np.cos(angle) * direction + np.sin(angle) * towards


def flow_signal(radius, travelled, protocol):
    """Blood signal relative to protocol.blood. Inflow enhancement fades towards the tissue level in slow
    flow (small vessels) and with the distance the blood has travelled in the slab (saturation)."""
    inflow = np.clip((radius - 0.12) / 1.4, 0, 1) * np.exp(-travelled / protocol.saturation_mm)
    tissue = protocol.white / protocol.blood
    return tissue + (1 - tissue) * inflow


# ---------------------------------------------------------------- rasterisation with partial volume
def rasterise_vessels(branches, shape, spacing, chunk_mm=6.0):
    """Per voxel: vessel occupancy (0..1, partial volume) and blood signal (occupancy x brightness).

    Each branch is a chain of tapered capsules; voxels are visited only inside the bounding box of a chunk of
    segments (about chunk_mm long). Overlapping vessels combine by the maximum.
    """
    spacing = np.asarray(spacing, dtype=float)
    occupancy = np.zeros(shape, np.float32)
    blood = np.zeros(shape, np.float32)
    sigma = psf_sigma(spacing)
    origin = -(np.asarray(shape) - 1) / 2 * spacing  # mm of voxel (0, 0, 0), as utils/phantoms.py phantom_affine
    # voxel centres along each axis in units of sigma, shaped to broadcast over (x, y, z, segment)
    axes = [(axis[..., None] / np.float32(sigma)).astype(np.float32) for axis in voxel_axes_mm(shape, spacing)]
    for branch in branches:
        step = np.linalg.norm(branch.points[1] - branch.points[0])
        chunk = int(np.clip(chunk_mm / step, 4, 32))  # segments per box: boxes a few mm long, little waste
        for first in range(0, len(branch.points) - 1, chunk):
            part = slice(first, min(first + chunk, len(branch.points) - 1) + 1)
            _rasterise_chunk(branch.points[part], branch.radii[part], branch.brightness[part], occupancy, blood,
                             axes, origin, spacing, sigma)
    return occupancy, blood


def _rasterise_chunk(points, radii, brightness, occupancy, blood, axes, origin, spacing, sigma):
    edge = _occupancy_table()[2]  # farther than edge * sigma outside a wall, a voxel holds no vessel
    reach = radii.max() + edge * sigma
    low = np.maximum(np.floor((points.min(0) - reach - origin) / spacing).astype(int), 0)
    high = np.minimum(np.ceil((points.max(0) + reach - origin) / spacing).astype(int) + 1, occupancy.shape)
    if np.any(high <= low):
        return
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    px, py, pz = axes[0][box[0]], axes[1][:, box[1]], axes[2][:, :, box[2]]
    start = (points[:-1] / sigma).astype(np.float32)
    seg = (np.diff(points, axis=0) / sigma).astype(np.float32)
    r_start, r_change = (radii[:-1] / sigma).astype(np.float32), (np.diff(radii) / sigma).astype(np.float32)
    length2 = np.maximum((seg**2).sum(1), 1e-12)
    t = ((px - start[:, 0]) * seg[:, 0] + (py - start[:, 1]) * seg[:, 1] + (pz - start[:, 2]) * seg[:, 2]) / length2
    np.minimum(np.maximum(t, 0, out=t), 1, out=t)
    wall = np.sqrt((px - start[:, 0] - t * seg[:, 0]) ** 2 + (py - start[:, 1] - t * seg[:, 1]) ** 2
                   + (pz - start[:, 2] - t * seg[:, 2]) ** 2) - (r_start + t * r_change)
    # the segment whose wall is nearest decides a voxel (occupancy falls monotonically with the wall distance)
    box_shape = wall.shape[:3]
    wall, t = wall.reshape(-1, len(seg)), t.reshape(-1, len(seg))
    nearest = wall.argmin(axis=1)
    voxel = np.flatnonzero(wall[np.arange(len(wall)), nearest] < edge)
    if not voxel.size:
        return
    segment = nearest[voxel]
    t = t[voxel, segment]
    occ = tube_occupancy(wall[voxel, segment], r_start[segment] + t * r_change[segment])
    flow = brightness[segment] + t * (brightness[segment + 1] - brightness[segment])
    for target, values in ((occupancy, occ), (blood, occ * flow)):
        full = np.zeros(np.prod(box_shape), np.float32)
        full[voxel] = values
        np.maximum(target[box], full.reshape(box_shape), out=target[box])


def psf_sigma(spacing):
    """SD of a Gaussian standing in for the voxel's box (width/sqrt(12)), averaged over the three axes."""
    return float(np.sqrt(np.mean(np.square(spacing)) / 12))


@lru_cache(maxsize=1)
def _occupancy_table(step=0.05, edge=4.0, largest=8.0):
    """Fraction of a 2-D Gaussian (SD 1) centred at distance u from the axis that lies inside radius v.

    Tabulated over v in [0, largest] and w = u - v (signed distance to the wall) in [-edge, edge]; beyond
    `largest` a wall is flat enough that v = largest is exact to ~1%. This is the partial volume of a thin tube.
    """
    v = np.arange(0, largest + step / 2, step)
    w = np.arange(-edge, edge + step / 2, step)
    table = special.chndtr(v[:, None] ** 2, 2, (w[None, :] + v[:, None]) ** 2)
    table[table < 1e-3] = 0.0
    return table.astype(np.float32), step, edge, largest


def tube_occupancy(wall, radius):
    """Partial volume of a voxel whose centre is `wall` from the wall of a tube of `radius` (units: PSF SD).

    Bilinear interpolation in _occupancy_table.
    """
    table, step, edge, largest = _occupancy_table()
    row = np.minimum(radius, largest) / step
    col = (np.minimum(np.maximum(wall, -edge), edge) + edge) / step
    r0 = np.minimum(row.astype(np.int64), table.shape[0] - 2)
    c0 = np.minimum(col.astype(np.int64), table.shape[1] - 2)
    fr, fc = row - r0, col - c0
    top = table[r0, c0] * (1 - fc) + table[r0, c0 + 1] * fc
    bottom = table[r0 + 1, c0] * (1 - fc) + table[r0 + 1, c0 + 1] * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)
