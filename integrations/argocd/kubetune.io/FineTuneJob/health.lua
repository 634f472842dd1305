-- Argo CD health for kubetune.io/FineTuneJob. A run in progress is Progressing and a finished one
-- Healthy or Degraded, as Argo CD treats a batch Job; a job the operator cannot start (bad spec,
-- missing Secret, no GPU that fits) is Degraded with the operator's message, which says what to do.
-- Argo CD runs argocd-cm scripts without Lua's string library: base and table functions only.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function says(kind, fallback)
  local c = condition(kind)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local st = obj.status
if st == nil or st.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator (if it stays so: kubectl get pods -A -l app.kubernetes.io/name=kubetune)"
  return hs
end
if st.observedGeneration ~= nil and obj.metadata.generation ~= nil and st.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to act on generation " .. obj.metadata.generation
  return hs
end

local phase = st.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = says("Succeeded", "Succeeded")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = says("Failed", "Failed")
elseif phase == "Unschedulable" then
  hs.status = "Degraded"
  hs.message = says("Scheduled", "No node has GPUs that fit the job")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = says("Suspended", "Suspended by spec.runPolicy.suspend")
elseif phase == "Pending" then
  local v = condition("Validated")
  if v ~= nil and v.status == "False" then
    hs.status = "Degraded"
    hs.message = v.reason .. ": " .. v.message
  else
    hs.status = "Progressing"
    hs.message = says("Validated", "Pending")
  end
elseif phase == "Running" and st.progress ~= nil and st.progress.totalSteps ~= nil then
  local p = st.progress
  hs.status = "Progressing"
  hs.message = "Running: step " .. p.step .. "/" .. p.totalSteps
  if p.percent ~= nil then
    hs.message = hs.message .. " (" .. p.percent .. ")"
  end
  if p.loss ~= nil then
    hs.message = hs.message .. ", loss " .. p.loss
  end
  if p.state ~= nil and p.state ~= "training" then
    hs.message = hs.message .. ", " .. p.state
  end
else
  hs.status = "Progressing"
  hs.message = phase .. ": " .. says("Running", says("Scheduled", "waiting for the trainer"))
end
return hs
