#!/usr/bin/python3
"""lexico's batched OMP encoder next to scikit-learn's orthogonal_mp_gram, same data.

Run with Debian's interpreter, which sees python3-sklearn:

    /usr/bin/python3 bench/sklearn_omp.py --shape 128,4096,8,8192 --sklearn-vectors 512

bench_omp (in its LEXICO_OMP_DUMP mode) draws the dictionary and the vectors, codes
them, times itself (best of 5 encode() calls with 1 and with 2 threads) and writes
everything to a temporary folder. This script then codes the first
--sklearn-vectors of the same vectors with orthogonal_mp_gram (float32, the same
sparsity, Gram matrix precomputed and not timed, Dᵀx timed, BLAS limited to one
thread) and prints both throughputs, both mean relative reconstruction errors on
that common subset, and how often the two chose the same atoms.
"""

import argparse
import os
import subprocess
import tempfile
import time
import warnings

import numpy as np
from sklearn.linear_model import orthogonal_mp_gram
from threadpoolctl import threadpool_limits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default="build-omp/bench/bench_omp", help="path of the bench_omp program")
    parser.add_argument("--shape", default="128,4096,8,8192", help="d,N,s,B")
    parser.add_argument("--sklearn-vectors", type=int, default=512,
                        help="how many of the B vectors scikit-learn codes (it is slow)")
    parser.add_argument("--real", metavar="DIR",
                        help="a dictionary set written by lexico-train: code its dev vectors with its dictionary "
                             "(d and N from the set)")
    parser.add_argument("--layer", default="0,k", help="with --real: layer and part, L,k or L,v")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, LEXICO_OMP_DUMP=folder, LEXICO_OMP_SHAPE=args.shape)
        if args.real:
            env.update(LEXICO_OMP_REAL=args.real, LEXICO_OMP_LAYER=args.layer)
        subprocess.run([args.bench], env=env, check=True)
        with open(os.path.join(folder, "lexico.txt")) as f:
            info = dict(line.split() for line in f if line.strip())
        d, n, s, count = (int(info[key]) for key in ("d", "N", "s", "B"))  # real data set d, N and B
        atoms = np.fromfile(os.path.join(folder, "dictionary.f32"), dtype=np.float32).reshape(n, d)  # row = atom
        vectors = np.fromfile(os.path.join(folder, "vectors.f32"), dtype=np.float32).reshape(count, d)
        indices = np.fromfile(os.path.join(folder, "indices.u16"), dtype=np.uint16).reshape(count, s)
        coefs = np.fromfile(os.path.join(folder, "coefficients.f32"), dtype=np.float32).reshape(count, s)
        counts = np.fromfile(os.path.join(folder, "counts.u8"), dtype=np.uint8)

    m = min(args.sklearn_vectors, count)
    subset = vectors[:m]
    norms = np.linalg.norm(subset, axis=1)

    ours = np.zeros_like(subset)
    for b in range(m):
        used = counts[b]
        ours[b] = coefs[b, :used] @ atoms[indices[b, :used].astype(np.int64)]
    ours_error = np.mean(np.linalg.norm(subset - ours, axis=1) / norms)

    gram = atoms @ atoms.T  # N x N, not timed (the C++ encoder also gets it precomputed)
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ended prematurely due to linear dependence"
        start = time.perf_counter()
        xy = atoms @ subset.T  # N x m: Dᵀx is part of the encoding, as in C++
        theirs_coef = orthogonal_mp_gram(gram, xy, n_nonzero_coefs=s)  # N x m
        seconds = time.perf_counter() - start
    theirs = (atoms.T @ theirs_coef).T
    theirs_error = np.mean(np.linalg.norm(subset - theirs, axis=1) / norms)
    same_support = np.mean([
        set(np.flatnonzero(theirs_coef[:, b])) == set(indices[b, :counts[b]].astype(np.int64)) for b in range(m)
    ])

    data = f"real: {args.real}, layer {args.layer}" if args.real else "synthetic"
    print(f"d={d} N={n} s={s} ({data}); lexico timed on B={count} vectors, scikit-learn on the first {m}")
    print(f"{'encoder':<44}{'vectors/s':>12}{'mean rel. error':>18}")
    print(f"{'lexico OmpEncoder, 1 thread':<44}{float(info['vectors_per_s_1_thread']):>12.0f}{ours_error:>18.4f}")
    print(f"{'lexico OmpEncoder, 2 threads':<44}{float(info['vectors_per_s_2_threads']):>12.0f}{ours_error:>18.4f}")
    print(f"{'scikit-learn orthogonal_mp_gram, 1 thread':<44}{m / seconds:>12.1f}{theirs_error:>18.4f}")
    print(f"same atoms chosen (as sets): {100 * same_support:.1f} % of the {m} vectors")


if __name__ == "__main__":
    main()
