// DreamFlow Load Mesh: an upload button for mesh files (the frontend's own upload widget takes images and videos
// only). The file goes through ComfyUI's /upload/image route (any file type; what core's Load3D node uses too)
// into input/3d/, and the node's mesh_file list then names it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "DreamFlowLoadMesh";
const ACCEPT = ".glb,.gltf,.obj,.ply";

async function upload(file, combo) {
  const body = new FormData();
  body.append("image", file);
  body.append("subfolder", "3d");
  body.append("type", "input");
  const resp = await api.fetchApi("/upload/image", { method: "POST", body });
  if (resp.status !== 200) {
    alert(`DreamFlow Load Mesh: uploading ${file.name} failed (${resp.status} ${resp.statusText})`);
    return;
  }
  const data = await resp.json();
  const name = data.subfolder ? `${data.subfolder}/${data.name}` : data.name;
  if (!combo.options.values.includes(name)) combo.options.values.push(name);
  combo.value = name;
  combo.callback?.(name);
}

app.registerExtension({
  name: "DreamFlow.LoadMeshUpload",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const combo = this.widgets?.find((w) => w.name === "mesh_file");
      const input = Object.assign(document.createElement("input"), { type: "file", accept: ACCEPT });
      input.style.display = "none";
      document.body.append(input);
      input.onchange = async () => {
        if (input.files?.length && combo) await upload(input.files[0], combo);
        input.value = "";
      };
      this.addWidget("button", "choose mesh file to upload", null, () => input.click(), { serialize: false });
      const onRemoved = this.onRemoved;
      this.onRemoved = function () {
        input.remove();
        return onRemoved?.apply(this, arguments);
      };
      return result;
    };
  },
});
