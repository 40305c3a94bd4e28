// Shows the text a VRAMancer node returns in its "ui" output (the plan, the VRAM report) on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "vramancer.text",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("VRAMancer")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "vramancer_text");
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, "vramancer_text", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.inputEl.style.fontFamily = "monospace";
      }
      widget.value = text;
      this.setSize?.(this.computeSize());
    };
  },
});
