"""Peppered-moth allele frequencies from phenotype counts (gene counting).

From the "Expectation Maximization Algorithm" notes: 85 carbonaria, 196
insularia and 341 typica moths.  Each moth's genotype (CC, CI, CT, II, IT, TT)
is latent with Hardy-Weinberg probabilities from the allele frequencies
(p_C, p_I, p_T); the phenotype is a deterministic function of the genotype,
C dominant over I and T, I over T.  Dirichlet(1, 1, 1) is flat, so the MAP is
the MLE, known to be about (0.07084, 0.18874, 0.74043).
"""

import numpy as np
import pymc as pm
import pytensor.tensor as pt

import pm_em

PHENOTYPE_COUNTS = {"carbonaria": 85, "insularia": 196, "typica": 341}
GENOTYPES = ["CC", "CI", "CT", "II", "IT", "TT"]
# Row g is P(phenotype | genotype g): carbonaria, insularia, typica.
PHENOTYPE_GIVEN_GENOTYPE = np.array(
    [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=float
)
LITERATURE_MLE = np.array([0.07084, 0.18874, 0.74043])


def moth_phenotypes():
    """One phenotype code per moth: 0 carbonaria, 1 insularia, 2 typica."""
    return np.repeat(np.arange(3), list(PHENOTYPE_COUNTS.values()))


def build_model(phenotype):
    """Latent genotype per moth with Hardy-Weinberg probabilities."""
    coords = {
        "allele": ["C", "I", "T"],
        "genotype_label": GENOTYPES,
        "moth": np.arange(len(phenotype)),
    }
    with pm.Model(coords=coords) as model:
        allele_freq = pm.Dirichlet("allele_freq", a=np.ones(3), dims="allele")
        p_c, p_i, p_t = allele_freq[0], allele_freq[1], allele_freq[2]
        hardy_weinberg = pt.stack(
            [p_c**2, 2 * p_c * p_i, 2 * p_c * p_t, p_i**2, 2 * p_i * p_t, p_t**2]
        )
        pm.Deterministic("genotype_freq", hardy_weinberg, dims="genotype_label")
        genotype = pm.Categorical("genotype", p=hardy_weinberg, dims="moth")
        pm.Categorical(
            "phenotype",
            p=pt.as_tensor(PHENOTYPE_GIVEN_GENOTYPE)[genotype],
            observed=phenotype,
            dims="moth",
        )
    return model


def main():
    phenotype = moth_phenotypes()
    idata = pm_em.find_MAP(
        build_model(phenotype),
        initvals={"allele_freq": np.full(3, 1 / 3)},
        tol=1e-12,
        random_seed=5,
        progressbar=False,
    )
    post = idata.posterior.squeeze(("chain", "draw"))
    print(f"{'allele':<8}{'pm_em':>10}{'literature':>12}")
    for k, allele in enumerate(["C", "I", "T"]):
        print(f"p_{allele:<6}{float(post['allele_freq'][k]):>10.5f}{LITERATURE_MLE[k]:>12.5f}")
    print(f"EM iterations: {int(idata.em_stats['n_iter'])}")
    # Expected genotype counts among the carbonaria (the first 85 moths).
    expected = np.exp(post["lp_genotype"].values[: PHENOTYPE_COUNTS["carbonaria"]]).sum(0)
    print(
        "expected carbonaria genotypes:",
        {g: round(float(c), 2) for g, c in zip(GENOTYPES[:3], expected[:3], strict=True)},
    )


if __name__ == "__main__":
    main()
