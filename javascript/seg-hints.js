// Tooltips for the Smoothed Energy Guidance controls (element ids: seg-<tab>-<item>).
(function () {
    const hints = {
        "enabled": "Smoothed Energy Guidance: one extra UNet pass per step with blurred self-attention queries; the image is pushed away from that blurred prediction.",
        "scale": "SEG guidance scale. The paper keeps it at 3 and sets the strength with the blur sigma.",
        "infinite": "Infinite blur: every query is replaced by the mean query (the paper's default and strongest setting).",
        "sigma": "Gaussian blur sigma in tokens. Larger = stronger effect. Ignored while 'Infinite blur' is on.",
        "layer_preset": "Which self-attention layers are blurred. 'middle' is the paper's default (SDXL: all 10 middle transformers; Flux/Chroma: blocks d7-9,s7-9; Flux.2-Klein, which has fewer blocks: the middle block of each stream, 4B d2,s10, 9B d4,s12; SD3: j7-9). The infotext names the blocks that ran.",
        "custom_layers": "Block list: d4 = input block 4, m0 = middle block, u3 = output block 3; on SDXL .j picks transformer j (u0.3); ranges are inclusive (d7.2-9). The official code's indices work in brackets: ['m0'] = first middle layer. Flux/Chroma/SD3: transformer blocks, d7-9 = double-stream 7 to 9, s0-37 = single-stream, j7-9 = SD3 joint blocks; presets double, single, joint, all. A layer the model lacks is an error that lists the valid ones.",
        "start": "SEG starts at this fraction of the sampling steps (step i of n is at i/n).",
        "end": "SEG stops after this fraction of the sampling steps (inclusive).",
        "hires_mode": "Hires fix second pass: same settings, off, or its own scale and sigma.",
        "hires_scale": "SEG scale for the hires fix pass.",
        "hires_infinite": "Infinite blur for the hires fix pass.",
        "hires_sigma": "Blur sigma for the hires fix pass.",
    };

    function applyHints() {
        const app = gradioApp();
        for (const tab of ["txt2img", "img2img"]) {
            for (const [item, text] of Object.entries(hints)) {
                const ids = [`seg-${tab}-${item}`, `seg-${tab}-${item}-checkbox`];
                for (const id of ids) {
                    const element = app.getElementById(id);
                    if (element && element.title !== text) {
                        element.title = text;
                        element.querySelectorAll("label, span, input, textarea").forEach((child) => {
                            child.title = text;
                        });
                    }
                }
            }
        }
    }

    onUiLoaded(applyHints);
    onUiUpdate(applyHints);
})();
