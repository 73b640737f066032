-- Argo CD health check for serving.autoglm.io/AutoGLMDeployment.
-- Installed as argocd-cm's resource.customizations.health.serving.autoglm.io_AutoGLMDeployment
-- (see argocd-cm-patch.yaml); tests/unit/test_argocd_health.py runs it on sample objects.
local hs = {}
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end
if obj.status.observedGeneration == nil or obj.metadata.generation == nil
    or obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end
local ready = nil
local degraded = nil
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then ready = c end
  if c.type == "Degraded" then degraded = c end
end
if ready ~= nil and ready.status == "False"
    and (ready.reason == "InvalidSpec" or ready.reason == "Unschedulable") then
  hs.status = "Degraded"
  hs.message = ready.message or ready.reason
  return hs
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.message or degraded.reason or "Degraded"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
hs.status = "Progressing"
if ready ~= nil then
  hs.message = ready.message or ready.reason or "Not ready yet"
else
  hs.message = "Not ready yet"
end
return hs
