"""Guide: what gradient inversion and LAVP are, the two Hessians, what each page is for, and one-click demos
that open the Attack page with their settings filled in."""

from pathlib import Path

import streamlit as st

from lavp_ui.routing import draw_through_app
from lavp_ui.sidebar import K_ARCH, K_DATASET, K_INDEX, K_SEED, K_WEIGHTS

draw_through_app()  # first: a direct visit on a fresh server runs this file alone

st.title("LAVP Explorer")
st.caption("Gradient inversion attacks in federated learning, and the loss-aware vulnerability proxy (LAVP) of "
           "Hong et al., *Foreseeing Reconstruction Quality of Gradient Inversion: An Optimization Perspective* "
           "(AAAI 2024).")

st.header("Gradient inversion")
st.markdown(
    "In federated learning a client trains the server's model $f_w$ on its private image $x^*$ with label "
    "$y^*$ and sends back only the weight gradient $g^* = \\partial\\mathcal{L}(f_w(x^*), y^*)/\\partial w$. "
    "A curious server can still rebuild the image: it starts from noise $x$ and changes it until the gradient "
    "$g_w(x)$ that $x$ would produce *matches* $g^*$. The **matching loss** is usually the L2 distance "
    "$\\tfrac12\\lVert g_w(x) - g^*\\rVert^2$ (DLG, iDLG) or the cosine distance "
    "$1 - \\cos(g_w(x), g^*)$ (Inverting Gradients, GIFD). As the paper assumes, the server knows the label.")
st.markdown(
    "Some images come back almost perfectly, others stay noise, and the paper claims that **which images are "
    "most exposed depends on the matching loss**: image B may be rebuilt better than image C with the cosine "
    "loss and worse with L2 "
    "(the paper's Figure 1b). The gradient norm $\\lVert g^*\\rVert$, the usual vulnerability proxy, is the same "
    "whatever the loss, so, the paper argues, it cannot explain this.")

st.header("LAVP: a loss-aware vulnerability proxy")
st.markdown(
    "Near the true image the matching loss is a quadratic bowl, $\\mathcal{L}_{grad}(x^* + \\Delta x) \\approx "
    "\\tfrac12 \\Delta x^\\top H(x^*)\\,\\Delta x$, and how fast an attack descends it is governed by the "
    "bi-Lipschitz constants of the gradient map, i.e. by the **largest and smallest eigenvalues of the Hessian "
    "$H(x^*)$ of the matching loss at the ground truth**. LAVP is $\\lambda_{max}$ or $\\lambda_{min}$ of that "
    "Hessian, one per matching loss. With $J(x^*) = \\nabla_x g_w(x)\\rvert_{x = x^*}$, the Jacobian of the "
    "weight gradient with respect to the input, the paper derives (its equations 4 and 5):")
st.latex(r"H_{L2}(x^*) = J(x^*)^\top J(x^*)")
st.latex(r"H_{\cos}(x^*) = \frac{1}{\lVert g^*\rVert^2}\, J(x^*)^\top \left(I - "
         r"\frac{g^* g^{*\top}}{\lVert g^*\rVert\,\lVert g^*\rVert}\right) J(x^*)")
st.markdown(
    "Both are positive semi-definite. The paper claims that larger eigenvalues predict a *worse* reconstruction "
    "(larger MSE) under that loss. For an attacker whose loss is unknown, the paper fuses both: "
    "$\\sqrt{\\lambda_{max}(H_{L2})\\,\\lambda_{min}(H_{\\cos})}$ (its Table 3). This app computes the "
    "eigenvalues exactly (the dense Hessian, certified by residuals), matrix-free (Lanczos), or with the "
    "paper's own recipe (finite-difference Hessian-vector products and power iteration).")

st.header("The pages")
st.markdown(
    "- **Attack**: run DLG, iDLG, Inverting Gradients, the paper's protocol, R-CONV or GIFD on the image chosen "
    "in the sidebar and watch the reconstruction converge beside the ground truth; then see its similarity "
    "scores and the image's proxies.\n"
    "- **Proxies**: every proxy of the chosen image, the full eigenvalue spectra of the L2 and cosine Hessians, "
    "and a comparison of the exact, Lanczos and paper-recipe solvers (values, residuals, seconds).\n"
    "- **Study**: a results database of many attacks, plotted like the paper's Figures 2 and 3 (proxy against "
    "reconstruction quality, log-log, Spearman's σ_S per panel) with the Table 1 correlations and a CSV "
    "download.\n"
    "- **Rankings**: four images ranked by MSE under the L2 and the cosine attack side by side, and which proxy "
    "predicts each ranking (Figure 1b/1c).")
st.info("The sidebar's choices (dataset or your own image, index, architecture, weights, seed) are shared by "
        "every page.", icon=":material/info:")

# --------------------------------------------------------------------------------------------
# One-click demos: each sets the sidebar and the Attack page's widgets (a button's callback runs before any
# widget is drawn, so their values may still be set) and then opens the Attack page.

ATTACK_PAGE = str(Path(__file__).resolve().parent / "attack.py")
K_DEMO = "guide.open_attack"
DEMOS = {
    "dlg": {
        "title": "A photo leaking under DLG",
        "text": "DLG (L2 matching, L-BFGS) on photos #0 with random-weight cnn-rconv, 10 steps. Measured on a "
                "loaded 2-core CPU when this demo was chosen: 2.6 s to SSIM 0.65 (PSNR 19.9 dB).",
        "side": {K_DATASET: "photos", K_INDEX: 0, K_ARCH: "cnn-rconv", K_WEIGHTS: "random", K_SEED: 0},
        "attack": {"attack.preset": "dlg", "attack.compare": False, "attack.loss": "l2", "attack.steps": 10,
                   "attack.restarts": 1, "attack.lr": 1.0, "attack.tv": 0.0},
    },
    "compare": {
        "title": "L2 against cosine on one image",
        "text": "The paper's protocol on photos #0 with random-weight lenet, 2,000 steps, both losses at once, "
                "each beside its own LAVP. Measured alone: the cosine run reached SSIM 0.91 and the L2 run "
                "SSIM 0.22.",
        "side": {K_DATASET: "photos", K_INDEX: 0, K_ARCH: "lenet", K_WEIGHTS: "random", K_SEED: 0},
        "attack": {"attack.preset": "lavp-paper", "attack.compare": True, "attack.loss": "cos",
                   "attack.steps": 2000, "attack.restarts": 1, "attack.lr": 0.1, "attack.tv": 1e-4},
    },
    "rconv": {
        "title": "R-CONV's exact recovery",
        "text": "The analytical R-CONV attack on photos #0 with cnn-rconv: it solves the gradient's linear "
                "systems layer by layer, no optimisation; its outcome's MSE says how exact it was.",
        "side": {K_DATASET: "photos", K_INDEX: 0, K_ARCH: "cnn-rconv", K_WEIGHTS: "random", K_SEED: 0},
        "attack": {"attack.preset": "rconv", "attack.compare": False},
    },
}


def choose_demo(name: str) -> None:
    """A demo button's callback: fill in the sidebar and the Attack page, and ask for the Attack page."""
    demo = DEMOS[name]
    for key, value in {**demo["side"], **demo["attack"]}.items():
        st.session_state[key] = value
    for key in ("attack.record", "attack.compare_record", "attack.error"):
        st.session_state.pop(key, None)  # the demo's own run, not the last one, is what the page shows
    st.session_state[K_DEMO] = name


st.header("Try it: one-click demos")
st.markdown("Each button opens the **Attack** page with the demo's image, model and settings filled in; press "
            "**Run** (or **Compare**) there.")
demo_columns = st.columns(len(DEMOS))
for column, (demo_name, demo) in zip(demo_columns, DEMOS.items()):
    with column:
        st.markdown(f"**{demo['title']}**")
        st.caption(demo["text"])
        st.button("Open on the Attack page", key=f"btn.guide.demo.{demo_name}", on_click=choose_demo,
                  args=(demo_name,), icon=":material/open_in_new:")
if st.session_state.pop(K_DEMO, None):
    st.switch_page(ATTACK_PAGE)
