-- Argo CD health check for serving.autoglm.io/AutoGLMDeployment.
-- Installed as argocd-cm's resource.customizations.health.serving.autoglm.io_AutoGLMDeployment
-- (see argocd-cm-patch.yaml); tests/unit/test_argocd_health.py runs it on sample objects.
--   Healthy:     Ready, and no rollout in flight
--   Progressing: a rollout in flight, a status not yet computed for the latest spec, pods coming up
--   Suspended:   a rollout paused (a pause step, spec.canary.paused, a latency breach), or
--                scaled to zero on purpose
--   Degraded:    the canary failed or was rolled back, an invalid or unschedulable spec,
--                or the Degraded condition
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
local canary = obj.status.canary
local phase = nil
if canary ~= nil then phase = canary.phase end
local function said(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then return c.message end
  if c ~= nil and c.reason ~= nil then return c.reason end
  return fallback
end
-- A canary that failed or was rolled back (not one the spec simply dropped).
if (phase == "Failed" or phase == "RollingBack" or phase == "RolledBack")
    and canary.reason ~= "CanaryRemoved" and canary.reason ~= "Superseded" then
  hs.status = "Degraded"
  hs.message = "Canary " .. phase .. ": " .. said(canary, "")
  return hs
end
if ready ~= nil and ready.status == "False"
    and (ready.reason == "InvalidSpec" or ready.reason == "Unschedulable") then
  hs.status = "Degraded"
  hs.message = said(ready, "Not ready")
  return hs
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = said(degraded, "Degraded")
  return hs
end
if phase == "Paused" then
  hs.status = "Suspended"
  hs.message = "Canary paused: " .. said(canary, "")
  return hs
end
if ready ~= nil and ready.status == "False" and ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
  hs.message = said(ready, "Scaled to zero")
  return hs
end
if phase == "Progressing" or phase == "Analyzing" or phase == "Promoting" then
  hs.status = "Progressing"
  hs.message = "Canary " .. phase .. " at weight " .. tostring(canary.weight or 0) .. ": "
      .. said(canary, "")
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(ready, "Ready")
  return hs
end
hs.status = "Progressing"
hs.message = said(ready, "Not ready yet")
return hs
