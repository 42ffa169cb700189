"""SecFPP: hierarchical prompts P_i = P_G,c(i) + P_L,i with secret-shared adaptive clustering.

- ``lcc``: Lagrange coded computing over a prime field (shares, thresholds, decoding);
- ``quantize``: fixed-point embedding and the no-wrap-around check;
- ``reduce``: the public-basis dimension reduction;
- ``kmeans``: the adaptive k-means rule (shared by the secure run and its plaintext reference);
- ``protocol``: the clustering phase between users and a relaying server (encrypted shares, coded distances);
- ``simulate``: the method end to end in one process (per-cluster global prompts, local prompts on device).
See docs/secfpp.md.
"""
