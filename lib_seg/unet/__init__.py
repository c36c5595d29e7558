"""The UNet (ldm/sgm layout) side: attn1 query hooks, token merging, the shared prefix of SEG rows."""
