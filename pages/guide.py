"""Guide: what gradient inversion and LAVP are, the two Hessians, and what each page is for."""

import streamlit as st

from lavp_ui.routing import draw_through_app

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
    "Some images come back almost perfectly, others stay noise, and **which images are most exposed depends on "
    "the matching loss**: image B may be rebuilt better than image C with the cosine loss and worse with L2 "
    "(the paper's Figure 1b). The gradient norm $\\lVert g^*\\rVert$, the usual vulnerability proxy, is the same "
    "whatever the loss, so it cannot explain this.")

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
    "Both are positive semi-definite. Larger eigenvalues predict a *worse* reconstruction (larger MSE) under "
    "that loss. For an attacker whose loss is unknown, the paper fuses both: "
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
